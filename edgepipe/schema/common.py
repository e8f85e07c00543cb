"""Building blocks shared by the recipe and profile models: the strict base model, the closed
sets of precision values, block sizes, and the helpers that report problems per field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

Precision = Literal["int4", "int8", "fp16", "fp32"]
SidePrecision = Literal["int4", "int8", "fp16", "fp32", "same"]
Method = Literal["rtn", "hqq", "gptq"]

QUANTIZED: tuple[str, ...] = ("int4", "int8")


def check_block_size(value: int) -> int:
    """A MatMulNBits block size: a power of two from 16 to 256 (ValueError otherwise)."""
    if value < 16 or value > 256 or value & (value - 1):
        raise ValueError(
            f"must be a power of two from 16 to 256 (16, 32, 64, 128, 256), got {value}"
        )
    return value


BlockSize = Annotated[int, AfterValidator(check_block_size)]


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def base_dir(info: ValidationInfo) -> Path:
    """The folder of the YAML file being validated (the loaders pass it as `base_dir`)."""
    return Path((info.context or {}).get("base_dir", "."))


def resolve_path(value: str, info: ValidationInfo) -> Path:
    """`value` as an absolute path, relative ones taken from the YAML file's folder."""
    # Relative paths resolve against the YAML file's folder, so a recipe means the same thing
    # whatever directory `edgepipe build` runs from.
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir(info) / path).resolve()


class FieldProblems(ValueError):
    """Several problems found by one model validator, each tied to a field below the model.

    The loaders report each at its own dotted path instead of one joined message.
    """

    def __init__(self, items: list[tuple[str, str]]):
        self.items = items
        super().__init__("; ".join(f"{field}: {message}" for field, message in items))


def one_of(model: BaseModel, names: tuple[str, ...]) -> None:
    """Raise ValueError unless exactly one of the fields `names` of `model` is set."""
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        got = f"got {', '.join(given)}" if given else "got none"
        raise ValueError(f"give exactly one of {', '.join(names)} ({got})")
