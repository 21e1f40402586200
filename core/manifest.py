"""The one manifest schema of a VLM export folder (`tokensieve export-vlm` / vlm_api.export_vlm), every family.

    write_vlm_manifest(out_dir / "manifest.json", VlmManifest(...))      # atomically
    m = read_vlm_manifest(out_dir)                                        # whichever family's file is there

The file is named by the family (LLaVA: llava_parts.json, Qwen2-VL: manifest.json; VLM_MANIFEST_NAMES), the content
is this one frozen dataclass with a `version`. It is read without fallbacks: every field is required (but `inner`,
None without inner pruning, `engines`, empty until engines are built, and `verification`, None until a verification
is recorded); a manifest without `version` (written before this schema) or of another version is refused with one
line saying to re-export the folder.

`verification` records the check of the parts against eager (`tokensieve export-vlm`: vlm_api.record_verification
after verify_vlm, or with --no-verify): {"status": "passed" | "failed" | "not run", "when": UTC ISO time, and for a
run one the greedy-token / keep_idx equality, the max |diff| of logits and features, atol, batch, steps, backend}.
A manifest without it records no verification (the Python API's export_vlm alone): `inspect` shows it as UNVERIFIED,
as it shows "not run", and a failed one as FAILED (verification_line).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tokensieve.errors import ConfigError
from tokensieve.fileio import write_json_atomic
from tokensieve.trust import check_manifest_files

VLM_MANIFEST_VERSION = 1
VLM_MANIFEST_NAMES = ("llava_parts.json", "manifest.json")  # LLaVA, Qwen2-VL
PARTS = ("vision", "prefill", "decode")


@dataclass(frozen=True)
class VlmManifest:
    """What an export folder holds and what its pipeline needs to run the parts."""

    version: int
    model_type: str                 # the family ("llava", "qwen2_vl")
    modality: str                   # "image" | "video"
    grid_thw: list[int] | None      # the static grid (t, h, w) in patches; None: the family's fixed image size
    prune: str                      # the outer stage written back in full (cls-topk@1:4, attn-mean:6)
    method: str
    options: dict
    keep: int                       # K: image tokens the outer stage keeps
    image_tokens: int               # what it keeps them from (LLaVA: patches; Qwen2-VL: merged image / video tokens)
    num_image_tokens: int           # image tokens a prompt carries (K; LLaVA 'full': K + 1)
    placeholder_token_id: int       # the prompt's image (video) token
    num_text_layers: int
    layout: dict                    # the family's layout, as its dataclass fields
    files: dict[str, str]           # part (and extra file) -> file name in the folder
    sizes: dict[str, int]
    seconds: dict[str, float]
    vision_ops: dict[str, int]
    prefill_ops: dict[str, int]
    inner: dict | None = None       # inner pruning (FastvSpec.to_dict()), None without
    engines: dict[str, dict] = field(default_factory=dict)  # part -> engine entry (vlm_api.build_vlm)
    verification: dict | None = None  # the recorded check against eager (module docstring), None: none recorded

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["inner"] is None:
            del out["inner"]
        if not out["engines"]:
            del out["engines"]
        if out["verification"] is None:
            del out["verification"]
        return out


_REQUIRED = [f.name for f in fields(VlmManifest) if f.name not in ("inner", "engines", "verification")]
VERIFICATION_STATUSES = ("passed", "failed", "not run")


def verification_line(entry: dict | None) -> tuple[str, bool]:
    """One line for a manifest's `verification` entry (`tokensieve inspect`) -> (text, not failed):
    "PASS: ...", "FAILED verification: ..." or "UNVERIFIED: ..."."""
    if entry is None:
        return ("UNVERIFIED: the manifest records no verification (exported without `tokensieve export-vlm`'s check "
                "or by an older tokensieve); re-export with `tokensieve export-vlm`"), True
    when = f" ({entry['when'].replace('T', ' ').removesuffix('Z')} UTC)"
    if entry["status"] == "not run":
        return f"UNVERIFIED: exported with --no-verify{when}", True
    passed = entry["status"] == "passed"
    same = {True: "identical", False: "DIFFER"}
    parts = [f"{entry['steps']} greedy tokens {same[entry['tokens_match']]}"]
    if entry.get("keep_idx_match") is not None:
        parts.append(f"keep_idx {same[entry['keep_idx_match']]}")
    if entry.get("inner_keep_idx_match") is not None:
        parts.append(f"FastV kept image tokens {same[entry['inner_keep_idx_match']]}")
    parts.append(f"max |Δ logits| {entry['max_abs_diff_logits']:.1e} (atol {entry['atol']:g})")
    head = "PASS" if passed else "FAILED verification"
    return f"{head}: " + ", ".join(parts) + f"; batch {entry['batch']} vs eager on {entry['backend']}{when}", passed


# --------------------------------------------------------------------------- field types of a document read back


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(pred):
    return lambda v: isinstance(v, list) and all(pred(x) for x in v)


def _dict_of(pred):
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and pred(x) for k, x in v.items())


def _optional(pred):
    return lambda v: v is None or pred(v)


def _any(_v) -> bool:
    return True


def check_field_types(data: dict, checks: dict, where: str, fix: str, error: type[Exception] = ConfigError) -> None:
    """One-line `error` naming the first key of `checks` present in `data` whose value fails its check (a wrong type
    in a hand-edited or corrupted document), before any code indexes into it."""
    for key, ok in checks.items():
        if key in data and not ok(data[key]):
            raise error(f"{where}: {key} holds {excerpt(data[key], 40)}, not what this tokensieve writes there; {fix}")


_VLM_TYPES = {
    "version": _is_int, "model_type": lambda v: isinstance(v, str), "modality": lambda v: v in ("image", "video"),
    "grid_thw": _optional(lambda v: _list_of(_is_int)(v) and len(v) == 3), "prune": lambda v: isinstance(v, str),
    "method": lambda v: isinstance(v, str), "options": _dict_of(_any), "keep": _is_int, "image_tokens": _is_int,
    "num_image_tokens": _is_int, "placeholder_token_id": _is_int, "num_text_layers": _is_int, "layout": _dict_of(_any),
    "files": _dict_of(lambda v: isinstance(v, str)), "sizes": _dict_of(_is_num), "seconds": _dict_of(_is_num),
    "vision_ops": _dict_of(_is_num), "prefill_ops": _dict_of(_is_num), "inner": _optional(_dict_of(_any)),
    "engines": _dict_of(lambda v: isinstance(v, dict) and isinstance(v.get("file"), str)),
    "verification": _optional(lambda v: _is_verification(v)),
}


def _is_verification(v) -> bool:
    """A `verification` entry verification_line can print: a known status and a time, and for a run one its counts,
    equalities and diffs of the right types."""
    short = lambda x: isinstance(x, str) and len(x) <= 40  # noqa: E731 - quoted in the one line
    if not (isinstance(v, dict) and v.get("status") in VERIFICATION_STATUSES and short(v.get("when"))):
        return False
    if v["status"] == "not run":
        return True
    flag = _optional(lambda x: isinstance(x, bool))
    return (isinstance(v.get("tokens_match"), bool) and flag(v.get("keep_idx_match"))
            and flag(v.get("inner_keep_idx_match")) and _is_num(v.get("max_abs_diff_logits"))
            and _optional(_is_num)(v.get("max_abs_diff_features")) and _is_num(v.get("atol"))
            and _is_int(v.get("steps")) and _is_int(v.get("batch")) and short(v.get("backend")))


# report.json (tokensieve.export/1) fields that verify / bench / inspect read back
EXPORT_REPORT_TYPES = {
    "model": lambda v: isinstance(v, str), "recipe_shorthand": lambda v: isinstance(v, str),
    "input_shape": lambda v: _list_of(_is_int)(v) and len(v) >= 2 and all(x > 0 for x in v),
    "block_paths": _list_of(lambda v: isinstance(v, str)),
    "layout": lambda v: isinstance(v, dict) and _is_int(v.get("num_prefix_tokens")),
    "stages": _list_of(lambda v: isinstance(v, dict) and _is_int(v.get("after_block")) and isinstance(v.get("method"), str)
                       and isinstance(v.get("options", {}), dict)),
    "tokens_per_block": _list_of(_is_int), "macs_dense": lambda v: _is_num(v) and v > 0,
    "macs_pruned": lambda v: _is_num(v) and v > 0, "ideal_speedup": _is_num,
    "verify": lambda v: isinstance(v, dict) and all(k in v for k in ("passed", "num_inputs", "max_abs_diff", "atol"))
    and _is_num(v["max_abs_diff"]) and _is_num(v["atol"]) and _is_int(v["num_inputs"]),
    "build": _optional(lambda v: isinstance(v, dict)),
    # every engine built in the folder from its ONNX files (the export's, `tokensieve build`'s, bench's dense one)
    "engines": _list_of(lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in
                                                              ("file", "metadata", "onnx", "target", "precision"))),
    "engine_skipped": lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("reason", "target")),
}


MAX_DOCUMENT_BYTES = 16 << 20   # a report, manifest, engine metadata or recipe is kilobytes; more is not one of ours
MAX_DOCUMENT_NODES = 100_000    # values in a parsed document (after YAML aliases are expanded)


def excerpt(value: object, limit: int = 60) -> str:
    """A bounded repr of a value taken from user input, for an error message: nested or aliased structures (a YAML
    billion-laughs list) and long strings are cut, never expanded."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    try:
        text = r.repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        text = f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    text = " ".join(text.split())  # one line whatever the input held
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refuse(error: type[Exception], what: str, path: str | Path, reason: str, fix: str,
            detail: str | None = None) -> Exception:
    """`error("Cannot read WHAT 'PATH': REASON; FIX")`, with `.detail` (the parser's error, else REASON) kept for a
    caller that words the message its own way."""
    e = error(f"Cannot read {what} {str(path)!r}: {reason}; {fix}")
    e.detail = detail or reason
    return e


def read_regular_file(path: str | Path, what: str, fix: str, *, limit: int = MAX_DOCUMENT_BYTES,
                      error: type[Exception] = ConfigError) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; otherwise a one-line `error`
    ("Cannot read WHAT 'PATH': REASON; FIX"). A FIFO, a device (/dev/zero, /dev/urandom) or a folder is refused
    without reading from it (opened non-blocking, so a FIFO without a writer cannot hang), and no more than
    `limit` + 1 bytes are ever read."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:  # missing, a folder (EISDIR), no permission, a path under a file (ENOTDIR), ...
        raise _refuse(error, what, path, e.strerror or type(e).__name__, fix) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
                    if stat.S_ISSOCK(st.st_mode) else "something else")
            raise _refuse(error, what, path, f"it is {kind}, not a regular file", fix)
        too_big = f"it is more than the {limit / 2**20:g} MiB such a file can be"
        if st.st_size > limit:
            raise _refuse(error, what, path, f"{too_big} ({st.st_size / 2**20:.1f} MiB)", fix)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew while being read
            raise _refuse(error, what, path, too_big, fix)
        return b"".join(chunks)
    except OSError as e:
        raise _refuse(error, what, path, e.strerror or type(e).__name__, fix) from None
    finally:
        os.close(fd)


def check_creatable_dir(path: str | Path, flag: str) -> None:
    """One-line ConfigError unless folder `path` exists or could be created, and is writable, checked WITHOUT creating
    it: an output is checked before a long run, and a run that then fails leaves no empty folder behind."""
    import os

    existing = Path(os.path.abspath(path))
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a folder; pass another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r}: folder {str(existing)!r} is not writable; pass another {flag}")


def parse_document(raw: bytes, fmt: str, what: str, path: str | Path, fix: str, *, label: str | None = None,
                   error: type[Exception] = ConfigError) -> object:
    """`raw` parsed as "json", "toml" or "yaml" (safe: plain data only); a one-line `error` ("Cannot read WHAT 'PATH':
    it is not valid LABEL (...); FIX") for invalid UTF-8, a syntax error, nesting too deep to parse, or more than
    MAX_DOCUMENT_NODES values (YAML aliases expanded: a billion-laughs file is refused before it is built). The
    parser's message is quoted cut to 80 characters."""
    import json

    label = label or fmt.upper()
    try:
        text = raw.decode("utf-8")
        if fmt == "json":
            data = json.loads(text)
        elif fmt == "toml":
            import tomllib

            data = tomllib.loads(text)
        elif fmt == "yaml":
            data = _safe_yaml(text)
        else:
            raise ValueError(f"unknown document format {fmt!r}")
    except RecursionError:
        raise _refuse(error, what, path, f"it is not valid {label} (it nests too deeply to be parsed)", fix) from None
    except DocumentTooLarge as e:
        raise _refuse(error, what, path, str(e), fix) from None
    except UnicodeDecodeError as e:
        raise _refuse(error, what, path, f"it is not valid {label} (not UTF-8 at byte {e.start})", fix,
                      detail=f"UnicodeDecodeError at byte {e.start}") from None
    except Exception as e:  # noqa: BLE001 - every parser error is the file's: JSON/TOML/YAML each raise their own
        reason = " ".join(str(e).split()) or type(e).__name__
        reason = reason if len(reason) <= 48 else reason[:45] + "..."
        raise _refuse(error, what, path, f"it is not valid {label} ({reason})", fix,
                      detail=f"{type(e).__name__}: {reason}") from None
    if _count_values(data) > MAX_DOCUMENT_NODES:
        raise _refuse(error, what, path, f"it holds more than {MAX_DOCUMENT_NODES} values", fix)
    return data


class DocumentTooLarge(ValueError):
    """A YAML document whose aliases expand past MAX_DOCUMENT_NODES values, or refer to themselves."""


def _count_values(data: object, limit: int = MAX_DOCUMENT_NODES) -> int:
    """Values in a parsed document; counting stops past `limit` (no recursion: any depth)."""
    count, todo = 0, [data]
    while todo and count <= limit:
        item = todo.pop()
        count += 1
        if isinstance(item, dict):
            todo += item.keys()
            todo += item.values()
        elif isinstance(item, (list, tuple)):
            todo += item
    return count


def _safe_yaml(text: str) -> object:
    """yaml.safe_load, refusing before construction a document whose aliases expand to more than MAX_DOCUMENT_NODES
    values (billion laughs) or refer to themselves."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}  # node id -> expanded values; -1 while its children are being counted
        stack = [(node, False)]
        while stack:  # depth-first, memoized by node identity: an alias costs its expanded size, computed once
            n, done = stack.pop()
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            if done:
                sizes[id(n)] = min(1 + sum(sizes[id(c)] for c in children), MAX_DOCUMENT_NODES + 1)
            elif sizes.get(id(n)) == -1:  # in progress = an ancestor of itself
                raise DocumentTooLarge("a YAML alias refers to itself")
            elif id(n) not in sizes:
                sizes[id(n)] = -1
                stack.append((n, True))
                stack += [(c, False) for c in children]
        if sizes[id(node)] > MAX_DOCUMENT_NODES:
            raise DocumentTooLarge(f"its YAML aliases expand to more than {MAX_DOCUMENT_NODES} values")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_document(path: str | Path, fmt: str, what: str, fix: str, *, label: str | None = None,
                  limit: int = MAX_DOCUMENT_BYTES, error: type[Exception] = ConfigError) -> object:
    """read_regular_file + parse_document: the one way tokensieve reads a JSON / TOML / YAML file it is given."""
    raw = read_regular_file(path, what, fix, limit=limit, error=error)
    return parse_document(raw, fmt, what, path, fix, label=label, error=error)


def read_json_object(path: Path, what: str, fix: str, *, error: type[Exception] = ConfigError) -> dict:
    """The JSON object in `path` (an export's report or manifest, an engine's metadata); a one-line `error` ending in
    `fix` if it cannot be read (missing, not a regular file, too large) or decoded, or holds something other than an
    object."""
    data = read_document(path, "json", what, fix, error=error)
    if not isinstance(data, dict):
        raise _refuse(error, what, path, f"it holds a JSON {type(data).__name__}, not an object", fix)
    return data


def write_vlm_manifest(path: str | Path, manifest: VlmManifest) -> Path:
    """Write `manifest` as JSON at `path`, atomically."""
    return write_json_atomic(Path(path), manifest.to_dict())


def check_version(data: dict, path: Path, key: str, want, label: str, required, fix: str, reads: str) -> None:
    """One-line ConfigError unless `data[key] == want` (the file's format version: `label` in the message, `reads`
    what this tokensieve reads) and every `required` key is there; `fix` says what to do."""
    got = data.get(key)
    if got != want:
        shown = repr(str(got)[:30]) if isinstance(got, str) else str(got)[:30]
        what = f"has no {label} (an older tokensieve)" if got is None else f"is {label} {shown}"
        raise ConfigError(f"{str(path)!r} {what}; this tokensieve reads {reads}: {fix}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{str(path)!r} lacks {', '.join(missing)}; {fix}")


def find_vlm_manifest(folder: str | Path) -> Path | None:
    """The VLM manifest file in `folder` (one of VLM_MANIFEST_NAMES), or None."""
    return next((Path(folder) / n for n in VLM_MANIFEST_NAMES if (Path(folder) / n).is_file()), None)


def read_vlm_manifest(folder: str | Path, name: str | None = None) -> VlmManifest:
    """The manifest of an export folder (`name`, or whichever of VLM_MANIFEST_NAMES is there); one-line ConfigError
    for a missing, unreadable, version-less / other-version or incomplete one."""
    folder = Path(folder)
    path = folder / name if name is not None else find_vlm_manifest(folder)
    if path is None:
        raise ConfigError(f"{str(folder)!r} holds no VLM manifest ({' / '.join(VLM_MANIFEST_NAMES)}); pass the folder "
                          "export_vlm (tokensieve export-vlm) wrote")
    data = read_json_object(path, "a VLM manifest", "pass the folder export_vlm wrote, or re-export it")
    check_version(data, path, "version", VLM_MANIFEST_VERSION, "version", _REQUIRED,
                  "re-export the folder with `tokensieve export-vlm`", f"VLM manifest version {VLM_MANIFEST_VERSION}")
    check_field_types(data, _VLM_TYPES, repr(str(path)), "re-export the folder with `tokensieve export-vlm`")
    unknown = sorted(set(data) - {f.name for f in fields(VlmManifest)})
    if unknown:
        names = ", ".join(unknown)
        names = names if len(names) <= 60 else names[:57] + "..."
        raise ConfigError(f"{str(path)!r} has unknown field(s) {names}; re-export the folder with this "
                          "tokensieve")
    check_manifest_files(folder, data["files"], data.get("engines"), path.name, "re-export it with `tokensieve export-vlm`")
    return VlmManifest(**data)
