"""Recipes: typed, validated pruning stages (method, after which block, budget).

CLI shorthand: `METHOD[(name=value,…)]@BLOCKS:KEEP[+…]`, e.g. `cls-topk@3,6,9:0.7` or
`cls-topk(fuse=true)@4:0.5+ttv@8:0.5`, or ToMe's own form `tome(r=R[,inflect=I])`: R tokens merged inside every
block (its `parse_r` schedule; `MergeSchedule`), expanded to one stage per block when the model is known. Blocks are
0-based indices of the model's transformer blocks; KEEP with a dot is a ratio of the patch tokens
entering the stage (0 < r ≤ 1, kept count = ceil(r·n)); KEEP without a dot is a count of patch tokens.
Files (.toml, .yaml/.yml, .json) hold a list of stages:

    [[stage]]
    method = "cls-topk"
    after_block = 3
    keep = 0.7
"""
from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tokensieve.errors import ConfigError
from tokensieve.graph_passes.methods.registry import METHODS
from tokensieve.manifest import excerpt, read_document

# Beyond any model: a larger block index or keep count is a typo (and would be quoted in full by later messages).
MAX_BLOCK_INDEX = 100_000
MAX_KEEP_COUNT = 10**9


@dataclass(frozen=True)
class Budget:
    """How many patch tokens a stage keeps: a ratio of those entering it, or a count."""

    ratio: float | None = None
    count: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.count is None):
            raise ConfigError("A budget needs exactly one of a keep ratio or a keep count")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):  # NaN fails too
            raise ConfigError(f"keep ratio {self.ratio} is out of range; use 0 < keep <= 1 (e.g. 0.7)")
        if self.count is not None and not 1 <= self.count <= MAX_KEEP_COUNT:
            raise ConfigError(f"keep count {excerpt(self.count, 30)} is out of range; keep at least 1 patch token "
                              f"(and at most {MAX_KEEP_COUNT})")

    def resolve(self, num_patches: int) -> int:
        """The static K for a stage that receives `num_patches` patch tokens."""
        if self.ratio is not None:
            return max(1, math.ceil(self.ratio * num_patches - 1e-9))
        return self.count

    def __str__(self) -> str:
        if self.ratio is None:
            return str(self.count)
        return "1.0" if self.ratio == 1.0 else f"{self.ratio:g}"  # "1" would read back as a count of 1


# where a stage runs: `paper` = the method's paper placement (default), `block_out` = on the block's output
PLACEMENTS = ("paper", "block_out")


@dataclass(frozen=True)
class Stage:
    method: str
    after_block: int
    keep: Budget
    params: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ConfigError(unknown_method(self.method))
        if not isinstance(self.after_block, int) or isinstance(self.after_block, bool):
            raise ConfigError(f"after_block {excerpt(self.after_block, 30)} must be an integer block index")
        if self.after_block < 0:
            raise ConfigError(f"after_block={self.after_block} is negative; blocks are numbered from 0")
        if self.after_block > MAX_BLOCK_INDEX:
            raise ConfigError(f"after_block={excerpt(self.after_block, 30)} is beyond any model's blocks (at most "
                              f"{MAX_BLOCK_INDEX}); blocks are numbered from 0")
        spec = METHODS[self.method]
        known = {p.name for p in spec.params}
        checked = []
        for name, value in self.params:
            if name == "at":  # placement, a parameter of every stage (not of its method)
                if value not in PLACEMENTS:
                    raise ConfigError(f"{self.method}: at={excerpt(value, 30)} is not a placement; use at=paper (the "
                                      "paper's place, the default) or at=block_out (on the block's output)")
                checked.append((name, value))
                continue
            if not isinstance(name, str) or name not in known:
                allowed = ", ".join(sorted(known)) or "none"
                raise ConfigError(f"Method {self.method!r} has no parameter {excerpt(name, 40)}; its parameters: "
                                  f"{allowed}")
            try:
                checked.append((name, spec.param(name).check(value, self.method)))
            except ValueError as e:
                raise ConfigError(f"{e}; see `tokensieve methods`") from None
        object.__setattr__(self, "params", tuple(sorted(checked)))
        on = dict(checked)
        if on.get("recycle") and (on.get("fuse") or on.get("pospad")):
            other = "fuse" if on.get("fuse") else "pospad"
            raise ConfigError(f"{self.method}: recycle=true merges the dropped tokens into the kept ones, so {other}=true "
                              f"has nothing left to use; set only one of them")

    def options(self) -> dict:
        """The method's parameters with defaults filled in (the placement `at` is the stage's, not the method's)."""
        return {**METHODS[self.method].defaults(), **{k: v for k, v in self.params if k != "at"}}

    @property
    def placement(self) -> str:
        """`paper`: where the method's paper runs it (a stage whose gather can move into block L runs between its
        attention and MLP, see graph_passes/fx/hoist_token_gathers.py); `block_out`: on block L's output."""
        return dict(self.params).get("at", "paper")

    def shorthand(self, place: bool = True) -> str:
        """`METHOD[(name=value,…)]@BLOCK:KEEP`, or without `@BLOCK` (a VLM outer stage that has no block to name)."""
        text = self.method
        if self.params:
            text += "(" + ",".join(f"{k}={json.dumps(v)}" for k, v in self.params) + ")"
        return f"{text}@{self.after_block}:{self.keep}" if place else f"{text}:{self.keep}"

    def to_dict(self) -> dict:
        d = {"method": self.method, "after_block": self.after_block}
        d["keep"] = self.keep.ratio if self.keep.ratio is not None else self.keep.count
        if self.params:
            d["params"] = dict(self.params)
        return d


def unknown_method(name: object) -> str:
    """The one-line message for a method name that is not in METHODS (with the closest names, if any)."""
    import difflib

    close = difflib.get_close_matches(name, list(METHODS), n=3, cutoff=0.6) if isinstance(name, str) else []
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"Unknown method {excerpt(name, 40)}; {hint}`tokensieve methods` lists all {len(METHODS)}"


MAX_TOME_R = 10**6  # tokens merged per block: beyond any model


@dataclass(frozen=True)
class MergeSchedule:
    """ToMe's recipe form `tome(r=R[,inflect=I][,tome options])`: merge in every block, block i merging r_i tokens by
    facebookresearch/ToMe tome/utils.py `parse_r`: lo = int(R·(1 − I)), hi = 2R − lo, r_i = int(lo + (hi − lo)/(L − 1)·i)
    (I = 0: R in every block; I = −1: the paper's decreasing schedule, 2R down to 0), each capped at half the patch
    tokens entering the block as `bipartite_soft_matching` does (min(r, (t − protected) // 2)). The counts are static,
    as the code's: `stages` expands it once the block count and token layout are known."""

    r: int
    inflect: float = 0.0
    params: tuple[tuple[str, object], ...] = ()   # the other tome options (and `at`), checked as a Stage's

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_TOME_R:
            raise ConfigError(f"tome: r={excerpt(self.r, 30)} must be an integer from 1 to {MAX_TOME_R} (tokens merged "
                              "per block), e.g. tome(r=8)")
        bad = isinstance(self.inflect, bool) or not isinstance(self.inflect, (int, float))
        if bad or not -1.0 <= self.inflect <= 1.0:  # NaN fails the range
            raise ConfigError(f"tome: inflect={excerpt(self.inflect, 30)} must be a number in [-1, 1] (ToMe's parse_r: "
                              "-1 decreasing from 2r to 0, 0 constant, 1 increasing), e.g. tome(r=8,inflect=-1)")
        object.__setattr__(self, "inflect", float(self.inflect))
        # the options as a tome stage checks them (one-line errors for unknown names and bad values)
        object.__setattr__(self, "params", Stage("tome", 0, Budget(count=1), tuple(self.params)).params)

    def per_block(self, num_blocks: int) -> list[int]:
        """ToMe's parse_r(num_blocks, (r, inflect)): tokens to merge in each block, before the cap."""
        lo = int(self.r * (1.0 - self.inflect))
        hi = 2 * self.r - lo
        step = (hi - lo) / (num_blocks - 1) if num_blocks > 1 else 0.0  # parse_r divides by zero for one block
        return [int(lo + step * i) for i in range(num_blocks)]

    def stages(self, num_blocks: int, num_tokens: int, num_prefix_tokens: int) -> tuple[Stage, ...]:
        """One `tome@i:count` stage per block that merges (r_i capped at half its entering patch tokens, > 0)."""
        from tokensieve.graph_passes.methods.merge import tome_max_merge

        spatial = dict(self.params).get("spatial", False)
        out, n = [], num_tokens - num_prefix_tokens
        for i, r in enumerate(self.per_block(num_blocks)):
            r = min(r, tome_max_merge(n, spatial))
            if r > 0:
                out.append(Stage("tome", i, Budget(count=n - r), self.params))
                n -= r
        return tuple(out)

    def shorthand(self) -> str:
        inflect = f",inflect={self.inflect:g}" if self.inflect else ""
        rest = "".join(f",{k}={json.dumps(v)}" for k, v in self.params)
        return f"tome(r={self.r}{inflect}{rest})"

    def to_dict(self) -> dict:
        return {"method": "tome", "r": self.r, "inflect": self.inflect, "params": dict(self.params)}


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    schedule: MergeSchedule | None = None   # ToMe's every-block form instead of listed stages

    def __post_init__(self):
        if self.schedule is not None and self.stages:
            raise ConfigError(f"{self.schedule.shorthand()} already merges in every block; it cannot be combined with "
                              "other stages (list tome@BLOCKS:KEEP stages instead)")
        blocks = [s.after_block for s in self.stages]
        if len(set(blocks)) != len(blocks):
            raise ConfigError(f"Two stages after the same block in {blocks}; give each block at most one stage")
        object.__setattr__(self, "stages", tuple(sorted(self.stages, key=lambda s: s.after_block)))

    def to_dict(self) -> dict:
        if self.schedule is not None:
            return {"stages": [], "schedule": self.schedule.to_dict()}
        return {"stages": [s.to_dict() for s in self.stages]}

    def shorthand(self) -> str:
        if self.schedule is not None:
            return self.schedule.shorthand()
        return "+".join(s.shorthand() for s in self.stages) or "dense"

    def __str__(self) -> str:
        return self.shorthand()


def parse_recipe(text: str) -> Recipe:
    """Parse the CLI shorthand `cls-topk@3,6,9:0.7`, or a path to a .toml/.yaml/.json recipe file."""
    text = text.strip()
    if Path(text).suffix.lower() in (".toml", ".yaml", ".yml", ".json"):
        return load_recipe(text)
    if text in ("", "dense", "none"):
        return Recipe(())
    stages = []
    parts = text.split("+")
    for part in parts:
        m = _SCHEDULE.match(part.strip())
        if m:  # METHOD(…) with no @BLOCKS:KEEP: ToMe's every-block form
            if m["method"] != "tome":
                raise ConfigError(f"Cannot parse recipe {excerpt(part.strip(), 60)}: only tome has the every-block form "
                                  f"tome(r=R); write {RECIPE_EXAMPLE}")
            if len(parts) > 1:
                raise ConfigError(f"{excerpt(part.strip(), 60)} merges in every block; it cannot be combined with other "
                                  "stages (list tome@BLOCKS:KEEP stages instead)")
            return Recipe(schedule=merge_schedule(dict(_parse_params(m["params"], excerpt(part.strip(), 60)))))
        st = parse_stage_text(part, RECIPE_EXAMPLE)
        if st.places is None:
            raise ConfigError(f"Cannot parse recipe {part!r}; write {RECIPE_EXAMPLE}")
        stages += [st.stage(i) for i in st.places]
    return Recipe(tuple(stages))


# --------------------------------------------------------------------------- the one stage grammar

RECIPE_EXAMPLE = "METHOD@BLOCKS:KEEP, e.g. cls-topk@3,6,9:0.7 (ratio) or cls-topk@4:98 (count)"
RECIPE_FILE_FIX = "fix it or pass a shorthand like cls-topk@3:0.7"
_STAGE = re.compile(r"^(?P<method>[A-Za-z][\w-]*)\s*(?:\((?P<params>[^()]*)\))?\s*(?:@(?P<places>[^:]*))?:(?P<keep>.*)$")
_SCHEDULE = re.compile(r"^(?P<method>[A-Za-z][\w-]*)\s*\((?P<params>[^()]*)\)$")


def merge_schedule(params: dict) -> MergeSchedule:
    """`tome(r=…, inflect=…, …)`'s parameters (literals) -> MergeSchedule; one-line ConfigErrors."""
    if "r" not in params:
        raise ConfigError("tome(...) without @BLOCKS:KEEP is ToMe's every-block form and needs r (tokens merged per "
                          "block), e.g. tome(r=8) or tome(r=8,inflect=-1)")
    rest = tuple((k, v) for k, v in params.items() if k not in ("r", "inflect"))
    return MergeSchedule(params["r"], params.get("inflect", 0.0), rest)


@dataclass(frozen=True)
class StageText:
    """One stage as written, `METHOD[(name=value,…)][@PLACES]:KEEP`, parsed but not yet bound to a role: a ViT recipe
    stage (PLACES = blocks, required), a VLM's outer stage (LLaVA: optional @feature layer; Qwen2-VL: none) or its
    inner stage (`fastv@LAYER:KEEP`). Parameter values stay as written (`raw_params`); `params` reads them as TOML-like
    literals."""

    method: str
    raw_params: tuple[tuple[str, str], ...]
    places: tuple[int, ...] | None       # None: no @ given
    keep: Budget
    text: str

    @property
    def params(self) -> tuple[tuple[str, object], ...]:
        return tuple((k, _literal(v)) for k, v in self.raw_params)

    def stage(self, place: int) -> Stage:
        """The recipe Stage of this text at block/layer `place` (method and parameters checked against METHODS)."""
        return Stage(self.method, place, self.keep, self.params)


def parse_stage_text(text: str, example: str = RECIPE_EXAMPLE) -> StageText:
    """`cls-topk(fuse=true)@3,6:0.7` -> StageText; a one-line ConfigError naming `example` otherwise. Syntax only:
    what the method accepts is checked where the text gets its role (Stage, FastV)."""
    text = str(text).strip()
    where = excerpt(text, 60)  # what messages quote: an excerpt, however long the text
    m = _STAGE.match(text)
    if not m or not m["keep"].strip() or (m["places"] is not None and not m["places"].strip()):
        kind = "recipe" if example == RECIPE_EXAMPLE else "stage"
        empty = " (an empty stage: two '+' in a row, or a '+' at an end)" if not text else ""
        raise ConfigError(f"Cannot parse {kind} {where}{empty}; write {example}")
    raw = _raw_params(m["params"], where)
    places = None
    if m["places"] is not None:
        try:
            places = tuple(int(b) for b in m["places"].split(","))
        except ValueError:
            raise ConfigError(f"Block list {excerpt(m['places'], 40)} in {where} must be comma-separated integers, "
                              "e.g. 3,6,9") from None
    return StageText(m["method"], tuple(raw.items()), places, _parse_keep(m["keep"], where=text), text)


def _raw_params(text: str | None, where: str) -> dict[str, str]:
    """`name=value,…` as written -> {name: value text}; one-line ConfigErrors."""
    raw: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key:
            raise ConfigError(f"Parameter {excerpt(item, 40)} in {where} must be name=value, e.g. "
                              "cls-topk(fuse=true)@3:0.7")
        if key in raw:
            raise ConfigError(f"Parameter {excerpt(key, 40)} is given twice in {where}; give it once")
        raw[key] = value
    return raw


def _parse_params(text: str | None, where: str) -> tuple[tuple[str, object], ...]:
    return tuple((k, _literal(v)) for k, v in _raw_params(text, where).items())


def _literal(value: str) -> object:
    """A parameter value as a TOML-like literal (true, 0.5, 3, "x"); anything else stays the written string (which
    the method's parameter check then refuses with its type). One line only: a newline would let the value write
    other TOML keys."""
    value = value.strip()
    if any(ch in value for ch in "\r\n"):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # RecursionError: `fuse=[[[[…` nests too deeply to parse
        return value


def _parse_keep(value: object, where: str) -> Budget:
    """KEEP as written (a string) or as read from a recipe file (a number) -> Budget; a one-line ConfigError for
    anything else (NaN, inf, booleans, lists, words)."""
    where = excerpt(str(where), 60)
    if isinstance(value, bool):
        raise ConfigError(f"keep in {where} must be a ratio (0 < r <= 1) or a token count, not a boolean")
    if isinstance(value, int):
        return Budget(count=value)
    if isinstance(value, float):
        return Budget(ratio=value)
    if not isinstance(value, str):
        raise ConfigError(f"keep {excerpt(value, 30)} in {where} is not a number; use a ratio like 0.7 or a count "
                          "like 98")
    s = value.strip()
    try:
        return Budget(ratio=float(s)) if any(ch in s for ch in ".eE") else Budget(count=int(s))
    except ValueError:
        raise ConfigError(f"keep {excerpt(s, 30)} in {where} is not a number; use a ratio like 0.7 or a count like "
                          "98") from None


def load_recipe(path: str | Path) -> Recipe:
    """Load a recipe file (.toml, .yaml/.yml, .json) holding `stage = [{method, after_block, keep, params?}, …]`."""
    p = Path(path)
    fmt = {".toml": "toml", ".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(p.suffix.lower())
    if fmt is None:
        raise ConfigError(f"Recipe file {str(p)!r} must end in .toml, .json, .yaml or .yml")
    # bounded: a regular file of at most 16 MiB, valid UTF-8, YAML aliases expanding to at most 100000 values
    data = read_document(p, fmt, "recipe file", RECIPE_FILE_FIX, label=p.suffix[1:].upper())
    return recipe_from_dict(data, where=str(p))


def recipe_from_dict(data: object, where: str = "recipe") -> Recipe:
    if isinstance(data, dict) and "diffrate" in data:
        return recipe_from_diffrate(data["diffrate"], where)
    if isinstance(data, dict) and data.get("schedule") is not None:  # ToMe's every-block form (Recipe.to_dict)
        table = data["schedule"]
        if not isinstance(table, dict) or table.get("method") != "tome" or not isinstance(table.get("params", {}), dict):
            raise ConfigError(f"{where}: schedule must be a table with method = 'tome', r, optional inflect and params, "
                              "e.g. {\"method\": \"tome\", \"r\": 8}")
        if data.get("stages"):
            raise ConfigError(f"{where}: a tome schedule merges in every block; it cannot be combined with stages")
        return Recipe(schedule=merge_schedule({**(table.get("params") or {}),
                                               **{k: table[k] for k in ("r", "inflect") if k in table}}))
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table with a `stage` list")
    stages = data.get("stage", data.get("stages"))
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{where}: needs a non-empty `stage` list, e.g. [[stage]] method='cls-topk' after_block=3 keep=0.7")
    out = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: stage {i} must be a table with method, after_block and keep")
        unknown = [k for k in s if k not in ("method", "after_block", "keep", "params")]
        if unknown:
            raise ConfigError(f"{where}: stage {i} has unknown field(s) {excerpt(unknown, 60)}; allowed: method, "
                              "after_block, keep, params")
        for key in ("method", "after_block", "keep"):
            if key not in s:
                raise ConfigError(f"{where}: stage {i} is missing field {key!r}")
        if not isinstance(s["after_block"], int) or isinstance(s["after_block"], bool):
            raise ConfigError(f"{where}: stage {i} after_block must be an integer block index")
        params = s.get("params") or {}
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise ConfigError(f"{where}: stage {i} params must be a table of name = value")
        if not isinstance(s["method"], str):
            raise ConfigError(f"{where}: stage {i} method must be a method name, e.g. method = 'cls-topk'")
        out.append(Stage(s["method"], s["after_block"], _parse_keep(s["keep"], f"{where} stage {i}"),
                         tuple(sorted(params.items()))))
    return Recipe(tuple(out))


def recipe_from_diffrate(table: object, where: str = "recipe") -> Recipe:
    """A DiffRate-style budget table -> one `diffrate(prune_keep=P)@i:M` stage per block whose count drops.

    table = {"patches": n, "prune": [P_0, P_1, ...], "merge": [M_0, M_1, ...]}: PATCH-token counts (prefix tokens such
    as [CLS] not included) entering block 0, and left after block i's pruning and after its merging; each list has
    one entry per block from block 0 (the rest of the blocks keep their tokens). Needs n >= P_0 >= M_0 >= P_1 >= ...
    """
    if not isinstance(table, dict) or not {"patches", "prune", "merge"} <= set(table):
        raise ConfigError(f"{where}: diffrate needs patches, prune and merge (patch token counts), e.g. "
                          "{\"patches\": 196, \"prune\": [196, 180], \"merge\": [190, 170]}")
    n, prune, merge = table["patches"], table["prune"], table["merge"]
    counts = [n, *(prune if isinstance(prune, list) else [None]), *(merge if isinstance(merge, list) else [None])]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise ConfigError(f"{where}: diffrate patches, prune and merge must be positive integer token counts (lists)")
    if len(prune) != len(merge) or not prune:
        raise ConfigError(f"{where}: diffrate prune and merge need one count per block each, got {len(prune)} and "
                          f"{len(merge)}")
    stages, entering = [], n
    for i, (p, m) in enumerate(zip(prune, merge)):
        if not entering >= p >= m:
            raise ConfigError(f"{where}: diffrate block {i}: {entering} patch tokens enter, prune leaves {p}, merge "
                              f"{m}; counts must not grow ({entering} >= prune >= merge)")
        if m < entering:
            if p == 1 and m == 1 and entering > 1:
                raise ConfigError(f"{where}: diffrate block {i}: prune to 1 token cannot be told from the ratio 1.0; "
                                  "use prune = the entering count (merge everything into one) instead")
            prune_keep = 1.0 if p == entering else float(p)
            stages.append(Stage("diffrate", i, Budget(count=m), (("prune_keep", prune_keep),)))
        entering = m
    return Recipe(tuple(stages))


@dataclass(frozen=True)
class ResolvedStage:
    """A stage bound to a model: static token counts in and out."""

    stage: Stage
    keep: int              # patch tokens kept (static K)
    tokens_in: int         # tokens entering the stage (prefix + patches)
    tokens_out: int        # tokens leaving it (prefix + kept + extra, e.g. EViT's fused token)
    num_prefix_tokens: int

    @property
    def options(self) -> dict:
        return self.stage.options()


def resolve_recipe(recipe: Recipe, num_blocks: int, num_tokens: int, num_prefix_tokens: int) -> list[ResolvedStage]:
    """Turn ratios into static K per stage for a model; ConfigError if a stage does not fit the model. A tome
    schedule (`tome(r=8)`) becomes its one stage per block first."""
    if recipe.schedule is not None:
        recipe = Recipe(recipe.schedule.stages(num_blocks, num_tokens, num_prefix_tokens))
    out, n = [], num_tokens
    for s in recipe.stages:
        if s.after_block >= num_blocks:
            raise ConfigError(
                f"Stage {s.method}@{s.after_block}: the model has blocks 0..{num_blocks - 1}; lower the block index"
            )
        patches = n - num_prefix_tokens
        k = s.keep.resolve(patches)
        if s.keep.count is not None and k >= patches:
            raise ConfigError(
                f"Stage {s.method}@{s.after_block}: keep={k} must be below the {patches} patch tokens entering block "
                f"{s.after_block}; lower keep or use a ratio"
            )
        spec = METHODS[s.method]
        if spec.video:
            raise ConfigError(f"Stage {s.method}@{s.after_block}: {s.method} is a video method (frames x positions) and "
                              f"a ViT has no frames; use it on a Qwen2-VL video: tokensieve export-vlm DIR --prune "
                              f"{s.method}:0.25 --grid T,H,W (T > 1)")
        prev = out[-1] if out else None
        if prev and METHODS[prev.stage.method].masks_attention(prev.options) and not (
                s.method == prev.stage.method and spec.masks_attention(s.options())):
            raise ConfigError(
                f"Stage {s.method}@{s.after_block} follows a stateful {prev.stage.method} stage (its token state only "
                f"{prev.stage.method} with the same options reads); make later stages the same, or move this one first"
            )
        if prev and prev.options.get("compact"):
            raise ConfigError(
                f"Stage {s.method}@{s.after_block} follows {prev.stage.method}(compact=true)@{prev.stage.after_block}, "
                "which must be the last stage (its token count depends on the input); drop compact=true there or "
                "remove the later stages"
            )
        reason = spec.validate(patches, k, s.options()) if spec.validate else None
        if not reason and spec.validate_place:  # e.g. HiPrune: an earlier anchor block, no stage before it
            reason = spec.validate_place(s.after_block, n, num_tokens, s.options())
        if reason:
            raise ConfigError(f"Stage {s.method}@{s.after_block}: {reason}")
        n_out = num_prefix_tokens + k + spec.extra_tokens(s.options(), patches, k)
        out.append(ResolvedStage(s, k, n, n_out, num_prefix_tokens))
        n = n_out
    return out
