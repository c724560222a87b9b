"""edgepack convert-lora: a PEFT LoRA adapter to llama.cpp's LoRA GGUF, by llama.cpp's own converter.

The converter (convert_lora_to_gguf.py with its conversion/ package and gguf-py) is taken from the sdist of the
installed llama-cpp-python, fetched once with pip into the user cache, and run by this interpreter in a child process.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import gguf
import msgspec

from edgepack.runtime.memory import format_mib
from edgepack.runtime.schema import SchemaError, decode_json

from .errors import PackagerError
from .llama_source import run_converter

OUTTYPES = ("f16", "f32", "q8_0")
SCRIPT = "convert_lora_to_gguf.py"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what the script reads, in its order


@dataclass(frozen=True)
class Converted:
    size: int
    architecture: str
    tensors: int
    ranks: tuple[int, ...]


def is_adapter(path: Path) -> bool:
    """Whether `path` is a PEFT adapter directory (what PEFT's save_pretrained writes)."""
    return (path / "adapter_config.json").is_file()


def convert(peft_dir: Path, base_dir: Path, output: Path, outtype: str = "f16") -> Converted:
    """Write `output`, llama.cpp's LoRA GGUF of the PEFT adapter in `peft_dir` for the HF model in `base_dir`
    (its config.json is enough: the base's weights are not read)."""
    check_inputs(peft_dir, base_dir)
    if not output.parent.is_dir():
        raise PackagerError(f"output directory {output.parent} does not exist")
    if outtype not in OUTTYPES:
        raise PackagerError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    with tempfile.TemporaryDirectory(dir=output.parent) as work:
        # A fixed name: the script fills {ftype}-style templates in its output name; and no half file at `output`.
        partial = Path(work) / "adapter.gguf"
        run_converter(SCRIPT, [str(peft_dir), "--base", str(base_dir), "--outfile", str(partial),
                               "--outtype", outtype], peft_dir)
        if not partial.is_file():
            raise PackagerError(f"{peft_dir}: llama.cpp's {SCRIPT} wrote nothing")
        partial.replace(output)
    converted = _read_converted(output)
    if not converted.ranks:
        raise PackagerError(f"{peft_dir}: llama.cpp's {SCRIPT} wrote no LoRA tensors to {output}")
    return converted


class _AdapterConfig(msgspec.Struct, frozen=True):
    """What edgepack needs of PEFT's adapter_config.json (its other fields are PEFT's and llama.cpp's business)."""

    lora_alpha: float
    peft_type: Literal["LORA"] = "LORA"


def check_inputs(peft_dir: Path, base_dir: Path) -> None:
    """Refuse, in one line, an adapter directory or a base that the script cannot read."""
    config_path = peft_dir / "adapter_config.json"
    if not config_path.is_file():
        raise PackagerError(f"{config_path}: no such file (a PEFT LoRA adapter directory has adapter_config.json "
                            f"and {WEIGHTS[0]})")
    if not any((peft_dir / name).is_file() for name in WEIGHTS):
        raise PackagerError(f"{peft_dir}: has no {' or '.join(WEIGHTS)}")
    try:
        decode_json(config_path.read_bytes(), _AdapterConfig, str(config_path))
    except OSError as exc:
        raise PackagerError(f"{config_path}: cannot read: {exc.strerror}") from None
    except SchemaError as exc:
        raise PackagerError(str(exc)) from None
    if not (base_dir / "config.json").is_file():
        raise PackagerError(f"{base_dir / 'config.json'}: no such file (--base is the base model's Hugging Face "
                            "directory; its config.json is enough)")


def _read_converted(path: Path) -> Converted:
    """What the adapter GGUF holds, as the summary line reports it."""
    reader = gguf.GGUFReader(path)
    # lora_b is ne = [rank, n_out] for every target (lora_a of token_embd is stored transposed)
    ranks = sorted({int(t.shape[0]) for t in reader.tensors if t.name.endswith(".lora_b")})
    return Converted(size=path.stat().st_size,
                     architecture=reader.fields["general.architecture"].contents(),
                     tensors=len(reader.tensors), ranks=tuple(ranks))


@click.command(name="convert-lora")
@click.argument("peft_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--base", "base_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The base model's Hugging Face directory (config.json is enough; weights are not read).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The adapter GGUF to write.")
@click.option("--outtype", default="f16", show_default=True, type=click.Choice(OUTTYPES),
              help="Type of the adapter's tensors.")
def convert_lora(peft_dir: Path, base_dir: Path, output: Path, outtype: str) -> None:
    """Convert a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) in PEFT_DIR to llama.cpp's
    LoRA GGUF, with llama.cpp's own convert_lora_to_gguf.py."""
    result = convert(peft_dir, base_dir, output, outtype)
    low, high = result.ranks[0], result.ranks[-1]
    rank = str(low) if low == high else f"{low}-{high}"
    click.echo(f"wrote {output}: {result.tensors} tensors, rank {rank}, for {result.architecture} "
               f"({outtype}, {format_mib(result.size, 1)})")
