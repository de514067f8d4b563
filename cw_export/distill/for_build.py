"""Which adaptor a build uses: an --adaptor-checkpoint (checked against the model and the schedule), the model's own
distilled adaptor when it was made for this schedule, guidance and weights, else one distilled now."""

from __future__ import annotations

from pathlib import Path

from ..adaptor import default_adaptor_config
from ..errors import InputError
from ..models.pipeline import SDModel, shipped_adaptor
from ..recipe import Recipe

def state_hash(state: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode() + tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def check_adaptor_checkpoint(recipe: Recipe, path: Path) -> None:
    """--adaptor-checkpoint goes with --adaptor learned and must be distilled for this sampler, steps and clock.

    Another guidance scale is allowed (the user chose this checkpoint) but said on stderr: the adaptor learned the
    low-res features of trajectories guided that way, and its error grows away from it. The model's shipped
    adaptor is instead only used at its own guidance (``shipped_checkpoint``)."""
    import sys

    from .checkpoint import check_schedule, read_checkpoint

    b = recipe.build
    if b.adaptor != "learned":
        raise InputError(f"--adaptor-checkpoint needs --adaptor learned (this build's adaptor is '{b.adaptor}')")
    checkpoint = read_checkpoint(path)
    check_schedule(checkpoint, b.sampler, b.steps, b.clock)
    distilled_at = checkpoint.training.get("guidance_scale")
    if distilled_at is not None and distilled_at != b.guidance_scale:
        print(f"cw-export: warning: adaptor checkpoint {path} was distilled at guidance {distilled_at:g}, this build "
              f"uses {b.guidance_scale:g} (cw-export distill --guidance {b.guidance_scale:g} makes a matching one)",
              file=sys.stderr)


def shipped_checkpoint(model: SDModel, recipe: Recipe):
    """The adaptor checkpoint the model's folder ships (``clockwork/adaptor.safetensors``, docs/model_folder.md;
    the built-in shapes model's is one), when it was distilled for this
    sampler, steps, clock and guidance and for these weights; else None."""
    from .checkpoint import check_model, check_schedule, read_checkpoint

    path = shipped_adaptor(model)
    if path is None:
        return None
    checkpoint, b = read_checkpoint(path), recipe.build
    if checkpoint.training.get("guidance_scale") != b.guidance_scale:
        return None  # distilled on trajectories of another guidance scale
    try:
        check_schedule(checkpoint, b.sampler, b.steps, b.clock)
        check_model(checkpoint, model.source["sha256"],
                    default_adaptor_config(model.unet, model.pooled_dim))
    except InputError:
        return None
    return checkpoint


def load_learned_adaptor(model: SDModel, recipe: Recipe, checkpoint_path: Path | None, latent: tuple[int, int],
                         shipped=None, progress: bool = True):
    """The --adaptor-checkpoint, checked against the model; without one, ``shipped`` (the model's own adaptor,
    from ``shipped_checkpoint``), else distilled now with the recipe's settings
    (cw_export.distill; cached, so the next build with the same settings reuses it)."""
    from .checkpoint import check_model, check_schedule, read_checkpoint
    from .train import distill_for_build

    b = recipe.build
    if checkpoint_path is not None:
        checkpoint = read_checkpoint(checkpoint_path)
    elif shipped is not None:
        checkpoint = shipped  # the model folder's own distilled adaptor (its clockwork/adaptor.safetensors)
    else:
        checkpoint = distill_for_build(model, recipe, latent, progress=progress)
    check_schedule(checkpoint, b.sampler, b.steps, b.clock)
    check_model(checkpoint, model.source["sha256"],
                default_adaptor_config(model.unet, model.pooled_dim))
    return checkpoint
