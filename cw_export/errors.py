"""User-facing error hierarchy.

Every failure a user can cause (bad flags, bad files, a bundle that fails its checks) raises a subclass of
``CwExportError``. The CLI catches exactly this base class once and prints one line with exit code 2; anything else
is a bug and keeps its traceback.
"""


class CwExportError(Exception):
    """Base class of errors caused by user input or a failed check, reported as one line."""


class InputError(CwExportError):
    """A command-line value or input file is invalid."""


class ModelError(CwExportError):
    """The model folder is missing, corrupt, or its UNet cannot be split."""


class RecipeError(CwExportError):
    """A recipe file is unknown, malformed, or has unknown keys."""


class PromptFileError(InputError):
    """A prompt file is empty, unreadable, binary or too large."""


class BundleError(CwExportError):
    """A bundle is missing files, was modified, or is not of a known schema."""


class ParityError(CwExportError):
    """A graph or trajectory fell below the recipe's parity thresholds."""


class SchedulerConfigError(CwExportError):
    """A sampler configuration uses an option the numpy runtime does not implement."""


class NumericError(CwExportError):
    """A run produced NaN or infinite values (inputs such as the guidance scale or init latents far out of range):
    reported as one line instead of writing a silently broken image or latents file."""
