"""Turn what a user names (a .gguf, a Hugging Face checkpoint directory, or a .edgepack bundle optionally as
BUNDLE#model) into GGUF paths.

A checkpoint is converted by llama.cpp's converter (or found in the cache); a bundle is installed into a private
temporary store first, so it is verified exactly as on a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from edgepack.runtime.bundle_format import BUNDLE_SUFFIX
from edgepack.runtime.store import Store

from . import convert_hf
from .errors import PackagerError


@dataclass(frozen=True)
class ModelFiles:
    label: str
    paths: list[Path]
    chat_template: str | None  # the manifest's choice; None: the GGUF's own


def resolve(spec: str, scratch: Path) -> ModelFiles:
    path_text, _, model = spec.partition("#")
    path = Path(path_text)
    if path.is_dir():
        if model:
            raise PackagerError(f"{spec}: '#model' only applies to {BUNDLE_SUFFIX} bundles")
        converted = convert_hf.converted(path, lambda line: click.echo(f"- {line}", err=True))
        return ModelFiles(f"{path.name}/ (converted)", [converted.gguf], None)
    if path.suffix == ".gguf":
        if model:
            raise PackagerError(f"{spec}: '#model' only applies to {BUNDLE_SUFFIX} bundles")
        if not path.is_file():
            raise PackagerError(f"{path}: no such file")
        return ModelFiles(path.name, [path], None)
    if path.suffix != BUNDLE_SUFFIX:
        raise PackagerError(f"{path}: expected a .gguf model, a Hugging Face checkpoint directory or a "
                            f"{BUNDLE_SUFFIX} bundle")
    store = Store(scratch / f"store-{len(list(scratch.glob('store-*')))}")
    manifest = store.install(path).manifest
    if not model and len(manifest.models) > 1:
        names = ", ".join(m.name for m in manifest.models)
        raise PackagerError(f"{path} holds several models ({names}): name one as {path}#NAME")
    info = manifest.model(model or None)
    return ModelFiles(f"{path.name}#{info.name}", store.segment_paths(manifest, info.name), info.chat_template)
