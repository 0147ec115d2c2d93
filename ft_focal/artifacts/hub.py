"""Push an export to the Hugging Face Hub, and load a model back (from a folder or the Hub).

The export itself (`ft-focal export`, the folder layout) is ft_focal/artifacts/export.py.

`ft-focal push RUN_OR_EXPORT_DIR REPO_ID [--private] [--revision BRANCH]` uploads through
`huggingface_hub` (a run is exported into a temporary folder first). The token comes from the
environment (HF_TOKEN) or `hf auth login`; it is never read, printed or written by ft_focal.
`ft_focal.load_model(EXPORT_DIR_OR_REPO_ID)` returns a ready classifier with its preprocessing.
"""


from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from ft_focal.artifacts.export import EXPORT_INFO, PICKLE_PATTERNS, export_run, is_export_dir, pickle_files, resolve_model_dir
from ft_focal.artifacts.saved import WEIGHTS, SavedModel, load_model_dir
from ft_focal.errors import UserError, one_line

if TYPE_CHECKING:
    from ft_focal.artifacts.plain import PlainClassifier

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- push


def _offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if check is not None else constants.HF_HUB_OFFLINE)


def _hf_api():
    """The HfApi used by push (tests replace this factory with a local stand-in).

    In offline mode no request can succeed: say so at once (before exporting anything)."""
    from huggingface_hub import HfApi

    if _offline():
        raise UserError("cannot reach the Hugging Face Hub: offline mode is enabled (HF_HUB_OFFLINE=1); "
                        "unset HF_HUB_OFFLINE to push")
    return HfApi()


@contextlib.contextmanager
def hub_errors(action: str) -> Iterator[None]:
    """Turn huggingface_hub / network failures into one-line UserErrors (never with a token)."""
    from huggingface_hub import errors as hf_errors

    transport: tuple = ()
    try:
        import httpx2  # huggingface_hub 2.x

        transport = (httpx2.TransportError,)
    except ImportError:  # pragma: no cover
        try:
            import httpx

            transport = (httpx.TransportError,)
        except ImportError:
            pass
    try:
        yield
    except hf_errors.OfflineModeIsEnabled:
        raise UserError(f"{action}: Hugging Face Hub offline mode is enabled (HF_HUB_OFFLINE=1); "
                        "unset HF_HUB_OFFLINE to use the network") from None
    except hf_errors.LocalTokenNotFoundError:
        raise UserError(f"{action}: no Hugging Face token found; run `hf auth login` or set HF_TOKEN") from None
    except hf_errors.HFValidationError as exc:
        raise UserError(f"{action}: {one_line(exc)}") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"{action}: repository not found, or the token has no access to it") from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise UserError(f"{action}: not authorised (HTTP 401): the Hugging Face token is missing or invalid; "
                            "run `hf auth login` or set HF_TOKEN") from None
        if status == 403:
            raise UserError(f"{action}: forbidden (HTTP 403): the token cannot write there "
                            "(use a write token, or a namespace you belong to)") from None
        raise UserError(f"{action}: the Hub answered HTTP {status} ({one_line(exc)})") from None
    except (ConnectionError, TimeoutError, *transport) as exc:
        raise UserError(f"{action}: cannot reach the Hugging Face Hub ({type(exc).__name__}: {one_line(exc)})") from None


def push_run(run_dir: str | os.PathLike, repo_id: str, private: bool = False, revision: Optional[str] = None,
             merge_lora: bool = False, commit_message: Optional[str] = None) -> str:
    """Upload an export folder, or export a run / final/ folder first (temporary folder); returns the URL.

    Order: check the credentials (`whoami`, no side effect), export, create the repo (exist_ok),
    create the branch `revision` if given, upload. Errors are one-line UserErrors.
    """
    source = Path(run_dir)
    if not source.exists():
        raise UserError(f"{source}: not found")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise UserError("push: a repo id (e.g. your-name/model-name) is required")
    check_repo_id(repo_id)
    export = is_export_dir(source)
    if export:
        bad = pickle_files(source)
        if bad:
            raise UserError(f"{source}: refusing to upload pickle files ({', '.join(p.name for p in bad[:3])})")
    else:
        resolve_model_dir(source)  # a clear error before touching the network
    action = f"push to {repo_id}"
    api = _hf_api()
    with hub_errors(action):
        api.whoami()
    with contextlib.ExitStack() as stack:
        if export:
            folder = source
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ft_focal_export_")))
            folder = export_run(source, tmp / "export", merge_lora=merge_lora, repo_id=repo_id)
        message = commit_message or f"Upload {json.loads((folder / EXPORT_INFO).read_text()).get('source', 'model')}" \
                                    f" (ft_focal export)"
        with hub_errors(action):
            api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
            result = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                       revision=revision, commit_message=message,
                                       ignore_patterns=PICKLE_PATTERNS + ["*.tmp", ".*"])
    url = getattr(result, "commit_url", None) or f"https://huggingface.co/{repo_id}" + (
        f"/tree/{revision}" if revision else "")
    logger.info("pushed %s to %s", source, url)
    return str(url)


# ----------------------------------------------------------------------------- load


@dataclasses.dataclass
class LoadedModel(SavedModel):
    """A ready classifier: `.model` (eval mode, CPU), `.transform()`, `.classnames`, and
    `logits` / `predict_proba` / `predict` over PIL images, file paths, HxWx3 uint8 arrays or
    already-transformed tensors ([3, H, W] or [B, 3, H, W])."""

    def _batch(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images.unsqueeze(0) if images.dim() == 3 else images
        if not isinstance(images, (list, tuple)):
            images = [images]
        transform = self.transform()
        tensors = []
        for image in images:
            if isinstance(image, torch.Tensor):
                tensors.append(image)
                continue
            tensors.append(transform(_to_pil(image)))
        return torch.stack(tensors)

    @torch.no_grad()
    def logits(self, images: Any, batch_size: int = 64) -> torch.Tensor:
        x = self._batch(images)
        device = next(self.model.parameters()).device
        self.model.eval()
        parts = [self.model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, len(self.classnames))

    def predict_proba(self, images: Any) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)

    def predict(self, images: Any) -> list[str]:
        return [self.classnames[i] for i in self.logits(images).argmax(dim=-1).tolist()]


def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"{path}: image not found")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise UserError(f"{path}: not a readable image ({one_line(exc)})") from None
    try:
        import numpy as np

        if isinstance(image, np.ndarray):
            return Image.fromarray(image).convert("RGB")
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"cannot use {type(image).__name__} as an image (PIL image, path, array or tensor)")


def check_repo_id(repo_id: str) -> None:
    """A one-line error, before any token or network use, for a string the Hub cannot take as a
    repository id (`name` or `namespace/name`: letters, digits, `-`, `_`, `.`; no `--` / `..`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{repo_id}: not a Hub repository id (write namespace/name or name: letters, digits, "
                        "'-', '_', '.'; no '--' or '..', at most 96 characters per part)") from None


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not text.startswith((".", "~"))


def load_model(source: str | os.PathLike, revision: Optional[str] = None,
               plain: bool = False) -> LoadedModel | PlainClassifier:
    """Load an export folder, a run / final/ folder, or a Hub repo id (via the local cache when offline).

    Returns a `LoadedModel`; with `plain=True` an `ft_focal.artifacts.plain.PlainClassifier` instead: an
    `nn.Module` (eval mode) taking RGB [B, 3, H, W] in [0, 1] that normalises inside, with the
    class order in `.classnames` (the RobustBench convention)."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        folder = resolve_model_dir(path)
    elif path.exists():
        raise UserError(f"{path}: is a file; give a model folder or a Hub repo id")
    elif isinstance(source, str) and _looks_like_repo_id(source):
        folder = _download(source, revision)
    else:
        raise UserError(f"{source}: not found (neither a model folder nor a Hub repo id)")
    saved = load_model_dir(folder)
    if plain:
        from ft_focal.artifacts.plain import plain_model

        return plain_model(saved)
    return LoadedModel(**{f.name: getattr(saved, f.name) for f in dataclasses.fields(SavedModel)})


def _download(repo_id: str, revision: Optional[str]) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    action = f"load {repo_id}"
    try:
        with hub_errors(action):
            folder = snapshot_download(repo_id, revision=revision, ignore_patterns=PICKLE_PATTERNS)
    except UserError:
        raise
    except hf_errors.LocalEntryNotFoundError:
        if _offline():
            raise UserError(f"{repo_id}: no such local folder, and as a Hub repo id it is not in the local Hugging "
                            "Face cache while offline mode is enabled (HF_HUB_OFFLINE=1)") from None
        raise UserError(f"{repo_id}: no such local folder, and as a Hub repo id it is neither in the local cache "
                        "nor reachable on the Hub") from None
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{action}: the repository has no {WEIGHTS} (not an ft_focal export)")
    return folder
