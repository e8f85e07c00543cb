"""The recipe x profile build matrix and its deterministic shards, for CI fan-out.

`edgepipe matrix --shards N` prints N entries `{"shard": "I/N", ...}`; each CI job runs
`edgepipe build RECIPES --shard I/N`, which builds exactly the pairs of slice I. Slices are
taken round-robin over the pairs sorted by (recipe, profile), so every pair lands in exactly one
shard whatever N is, and the same inputs always give the same slices on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from edgepipe.errors import InvalidInput


@dataclass(frozen=True, order=True)
class MatrixEntry:
    """One build: a recipe for one device profile.

    Attributes:
        recipe: the recipe name (`OUT/<recipe>/<profile>/` is where it lands).
        profile: the device-profile name.
        recipe_path: what to pass to `edgepipe build` (a shipped name or a YAML path).
    """

    recipe: str
    profile: str
    recipe_path: str = ""


def build_matrix(
    recipes: Iterable[tuple[str, str, Sequence[str]]], profiles: Sequence[str] | None = None
) -> list[MatrixEntry]:
    """Every (recipe, profile) pair, sorted.

    Args:
        recipes: `(name, path, targets)` per recipe.
        profiles: when given, keep only these profiles (like `build -p`), in any order.

    Returns:
        The pairs sorted by (recipe, profile), duplicates removed.
    """
    wanted = set(profiles) if profiles else None
    pairs = {
        MatrixEntry(name, profile, path)
        for name, path, targets in recipes
        for profile in targets
        if wanted is None or profile in wanted
    }
    return sorted(pairs)


def parse_shard(text: str) -> tuple[int, int]:
    """Parse `I/N` (1 <= I <= N) into `(I, N)`.

    Raises:
        InvalidInput: the text is not of that form.
    """
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        index, count = 0, 0
    if count < 1 or not 1 <= index <= count:
        raise InvalidInput(f"--shard: expected I/N with 1 <= I <= N (e.g. 1/4), got {text!r}")
    return index, count


def shard_slice(entries: Sequence[MatrixEntry], index: int, count: int) -> list[MatrixEntry]:
    """Slice `index` of `count` (1-based) of the sorted entries, round-robin.

    Round-robin rather than contiguous blocks so that the big models of one family spread over
    the shards instead of piling into one.
    """
    if count < 1 or not 1 <= index <= count:
        raise InvalidInput(f"shard {index}/{count}: expected 1 <= I <= N")
    ordered = sorted(entries)
    return ordered[index - 1 :: count]


def shard_entries(entries: Sequence[MatrixEntry], shards: int | None) -> list[dict]:
    """The matrix as CI job entries: one per shard (`shards` of them, or one per pair).

    Each entry has `shard` ("I/N", for `edgepipe build --shard`), a `name` for the job title
    and the `builds` it covers. Shards that would be empty are left out.
    """
    count = len(entries) if shards is None else shards
    if count < 1:
        return []
    jobs = []
    for index in range(1, count + 1):
        part = shard_slice(entries, index, count)
        if not part:
            continue
        name = ", ".join(f"{e.recipe}@{e.profile}" for e in part)
        jobs.append(
            {
                "shard": f"{index}/{count}",
                "name": name if len(part) <= 2 else f"{name.split(', ')[0]} +{len(part) - 1}",
                "builds": [{"recipe": e.recipe, "profile": e.profile} for e in part],
            }
        )
    return jobs


def format_matrix(entries: Sequence[MatrixEntry], fmt: str, shards: int | None = None) -> str:
    """Render the matrix.

    Args:
        entries: from `build_matrix`.
        fmt: `github` — one line `{"include": [...]}` for `$GITHUB_OUTPUT` and
            `strategy.matrix: ${{ fromJSON(...) }}`; `json` — an indented document with the
            pairs and the shards.
        shards: number of shards (default: one per pair).

    Raises:
        InvalidInput: unknown `fmt`.
    """
    jobs = shard_entries(entries, shards)
    if fmt == "github":
        include = [{"shard": j["shard"], "name": j["name"]} for j in jobs]
        return json.dumps({"include": include}, separators=(",", ":"))
    if fmt == "json":
        doc = {"builds": [asdict(e) for e in entries], "shards": jobs}
        return json.dumps(doc, indent=2)
    raise InvalidInput(f"--format: unknown format {fmt!r}; allowed values: github, json")
