"""TEST DOUBLE of BuildConfig in tensorrt_llm/builder.py (the fields batchinfer may set, with
the real defaults; max_seq_len None is deduced from the model at build time)."""
import dataclasses
from typing import Optional


@dataclasses.dataclass
class BuildConfig:
    max_input_len: int = 1024
    max_seq_len: Optional[int] = None
    opt_batch_size: int = 8
    max_batch_size: int = 2048
    max_beam_width: int = 1
    max_num_tokens: int = 8192
    opt_num_tokens: Optional[int] = None
    max_prompt_embedding_table_size: int = 0
    gather_context_logits: bool = False
    gather_generation_logits: bool = False
    strongly_typed: bool = True

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "plugin_config": {}}
