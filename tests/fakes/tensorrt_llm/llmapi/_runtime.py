"""TEST DOUBLE ONLY (no counterpart in TensorRT-LLM): runs the requests of a fake LLM in
batches with transformers on the CPU, in a background thread, and delivers each result
to the event loop that is awaiting it -- a small stand-in for the C++ executor."""

import queue
import threading
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class CpuRuntime:
    def __init__(self, checkpoint: str, tokenizer: str, max_batch_size: int):
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.max_batch_size = max_batch_size
        self.pending: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="trtllm-test-double", daemon=True)
        self.thread.start()

    def submit(self, result, params, max_input_len: Optional[int]) -> None:
        self.pending.put((result, params, max_input_len))

    def shutdown(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            item = self.pending.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self.pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.pending.put(None)
                    break
                batch.append(nxt)
            ok = []
            for result, params, max_input_len in batch:
                n = len(result.prompt_token_ids)
                if max_input_len is not None and n > max_input_len:  # the C++ executor's check
                    result._deliver("", [], None, error=f"Prompt length ({n}) exceeds maximum input "
                                                          f"length ({max_input_len}).")
                else:
                    ok.append((result, params))
            if ok:
                self._generate(ok)

    def _generate(self, batch) -> None:
        # The real executor seeds each request's own random state with SamplingParams.seed
        # (None: 0), so a sampled request's tokens do not depend on its batch mates. Here a
        # sampled request runs alone with the torch RNG seeded from it (greedy ones batch).
        greedy = [item for item in batch if item[1]._greedy_decoding]
        if greedy:
            self._generate_together(greedy)
        for item in batch:
            if not item[1]._greedy_decoding:
                with torch.random.fork_rng():
                    torch.manual_seed(item[1].seed or 0)
                    self._generate_together([item])

    def _generate_together(self, batch) -> None:
        prompts = [r.prompt_token_ids for r, _ in batch]
        width = max(len(p) for p in prompts)
        pad = batch[0][1].pad_id if batch[0][1].pad_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = all(params._greedy_decoding for _, params in batch)
        kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else \
            {"do_sample": True, "temperature": batch[0][1].temperature or 1.0, "top_p": batch[0][1].top_p}
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad,
                                      max_new_tokens=max(p.max_tokens for _, p in batch),
                                      eos_token_id=batch[0][1].end_id, **kwargs)
        for (result, params), row in zip(batch, out[:, width:].tolist(), strict=True):
            self._finish(result, params, row[: params.max_tokens])

    def _finish(self, result, params, tokens) -> None:
        finish, stop_reason = "length", None
        for i, t in enumerate(tokens):
            if t == params.end_id:
                tokens, finish, stop_reason = tokens[:i + 1], "stop", t
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=params.skip_special_tokens)
        for s in ([params.stop] if isinstance(params.stop, str) else params.stop or []):
            cut = text.find(s)
            if cut >= 0:
                keep = cut + len(s) if params.include_stop_str_in_output else cut
                text, finish, stop_reason = text[:keep], "stop", s
        result._deliver(text, tokens, finish, stop_reason)
