"""File integrity monitoring rules, in osquery's FIM configuration format.

    {"file_paths":    {"etc": ["/etc/%%"], "homes": ["/home/%/.ssh/%%"]},
     "exclude_paths": {"etc": ["/etc/ld.so.cache"]},
     "file_accesses": ["homes"]}

`%%` (only at the end) is the whole tree below, `%` one level or, inside a
path, any one name (expanded with glob when the rules are loaded). A plain
directory is its direct entries; a plain file, itself.

The same Rules serve three places: the BPF program's LPM trie (kernel_entries:
a superset, so that nothing watched is dropped there), the inotify watches
(watch_targets), and the exact verdict and category of each row (classify).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from vajrad.errors import ConfigError

TREE, LEVEL, EXACT = "tree", "level", "exact"
KEY_MAX = 256                      # bytes the kernel compares (bpf/vajra.h VAJRA_FIM_KEY_MAX)
SECTIONS = ("file_paths", "exclude_paths", "file_accesses")


@dataclass(frozen=True)
class Rule:
    category: str
    pattern: str          # as configured
    root: str             # a concrete path; for TREE and LEVEL it ends with "/"
    kind: str

    @property
    def directory(self) -> str:
        """The directory itself, without the trailing slash ("/" for the root)."""
        return self.root.rstrip("/") or "/"

    def covers(self, path: str) -> bool:
        if self.kind == EXACT:
            return path == self.root
        if path == self.directory:
            return True
        if not path.startswith(self.root):
            return False
        return self.kind == TREE or "/" not in path[len(self.root):]


@dataclass(frozen=True)
class KernelEntry:
    """One LPM trie entry: `key` bytes (with a NUL for exact paths)."""
    key: bytes
    kind: int             # bpf_abi.FIM_*
    length: int           # bytes of the prefix, without the NUL
    access: bool


@dataclass
class FimRules:
    includes: list[Rule] = field(default_factory=list)
    excludes: list[Rule] = field(default_factory=list)
    accesses: frozenset[str] = frozenset()
    unmatched: list[str] = field(default_factory=list)   # patterns whose glob found nothing

    def __bool__(self) -> bool:
        return bool(self.includes)

    def __eq__(self, other) -> bool:
        return isinstance(other, FimRules) and (self.includes, self.excludes, self.accesses) == \
            (other.includes, other.excludes, other.accesses)

    # --- verdicts -------------------------------------------------------------
    def classify(self, path: str, access: bool = False) -> str | None:
        """The category of a row about `path`, or None when nothing watches it
        (or, for a read, nothing that records reads). The most specific rule wins."""
        for rule in self._by_specificity:
            if access and rule.category not in self.accesses:
                continue
            if rule.covers(path) and not self.excluded(path, rule.category):
                return rule.category
        return None

    def excluded(self, path: str, category: str) -> bool:
        return any(r.category == category and r.covers(path) for r in self.excludes)

    @property
    def _by_specificity(self) -> list[Rule]:
        cached = self.__dict__.get("_sorted")
        if cached is None:
            cached = self.__dict__["_sorted"] = sorted(self.includes, key=lambda r: -len(r.root))
        return cached

    # --- the kernel's view -----------------------------------------------------------
    def kernel_entries(self) -> list[KernelEntry]:
        """LPM trie entries. The kernel keeps the longest matching prefix only,
        so each entry must already carry what the rules above it imply: a
        level rule inside a tree rule acts as the tree, and an exclusion is
        left out where another category still watches the spot."""
        from vajrad.kernel import abi as bpf_abi
        out: dict[bytes, KernelEntry] = {}

        rank = {bpf_abi.FIM_TREE: 3, bpf_abi.FIM_LEVEL: 2, bpf_abi.FIM_EXACT: 2, bpf_abi.FIM_EXCLUDE: 1}

        def put(key: bytes, kind: int, length: int, access: bool) -> None:
            have = out.get(key)
            if have is not None:               # an include beats an exclusion; a tree, a level
                if rank[have.kind] > rank[kind]:
                    kind = have.kind
                access = access or have.access
            out[key] = KernelEntry(key, kind, length, access)

        def enclosing_tree(rule: Rule) -> bool:
            return any(t.kind == TREE and t is not rule and rule.root.startswith(t.root)
                       for t in self.includes)

        def reads_below(root: str) -> bool:
            return any(r.category in self.accesses and (root.startswith(r.root) or r.root.startswith(root))
                       for r in self.includes)

        for rule in self.includes:
            access = reads_below(rule.root)
            raw = rule.root.encode()
            if rule.kind == EXACT:
                put(raw + b"\0", bpf_abi.FIM_EXACT, len(raw), access)
                continue
            kind = bpf_abi.FIM_TREE if rule.kind == TREE or enclosing_tree(rule) else bpf_abi.FIM_LEVEL
            put(raw, kind, len(raw), access)
            put(rule.directory.encode() + b"\0", bpf_abi.FIM_EXACT, len(rule.directory.encode()), access)
        for rule in self.excludes:
            others = [r for r in self.includes if r.category != rule.category
                      and (r.covers(rule.directory) or rule.root.startswith(r.root))]
            if others:
                continue
            raw = rule.root.encode()
            if rule.kind == EXACT:
                put(raw + b"\0", bpf_abi.FIM_EXCLUDE, len(raw), False)
            else:
                put(raw, bpf_abi.FIM_EXCLUDE, len(raw), False)
                put(rule.directory.encode() + b"\0", bpf_abi.FIM_EXCLUDE, len(rule.directory.encode()), False)
        return list(out.values())

    # --- inotify's view ------------------------------------------------------------
    def watch_targets(self) -> dict[str, bool]:
        """Directories to watch -> recursively. An exact file is watched
        through its directory, which survives the file being replaced."""
        targets: dict[str, bool] = {}
        for rule in self.includes:
            if rule.kind == EXACT:
                targets.setdefault(os.path.dirname(rule.root) or "/", False)
            else:
                targets[rule.directory] = targets.get(rule.directory, False) or rule.kind == TREE
        trees = [d.rstrip("/") + "/" for d, rec in targets.items() if rec]
        return {d: rec for d, rec in targets.items()
                if not any(d.startswith(t) for t in trees if t != d.rstrip("/") + "/")}


def _problem(pattern) -> str | None:
    if not isinstance(pattern, str) or not pattern:
        return "must be a non-empty string"
    if "\0" in pattern:
        return "must not contain NUL"
    if not pattern.startswith("/"):
        return "must be an absolute path"
    if "%%" in pattern[:-2] or (pattern.endswith("%%") and not pattern.endswith("/%%")):
        return "%% (recursive) is only allowed as the last path component, e.g. /etc/%%"
    if "%%%" in pattern:
        return "has more than two %"
    if len(pattern.rstrip("%").encode()) >= KEY_MAX:
        return f"the path before a wildcard must be shorter than {KEY_MAX} bytes"
    return None


def _expand(category: str, pattern: str, subtree: bool = False) -> tuple[list[Rule], bool]:
    """Rules for one pattern, and whether its glob matched anything.
    subtree: a directory stands for everything below it (exclusions)."""
    if pattern.endswith("/%%"):
        base, kind = pattern[:-2], TREE
    elif pattern.endswith("/%"):
        base, kind = pattern[:-1], LEVEL
    else:
        base, kind = pattern, None
    if "%" in base:
        matches = sorted(glob.glob(base.replace("%", "*")))
        if not matches:
            return [], False
    else:
        matches = [base]
    rules = []
    for path in matches:
        path = os.path.normpath(path) + ("/" if path.endswith("/") else "")
        if kind is None:
            is_dir = path.endswith("/") or os.path.isdir(path)
            k = LEVEL if is_dir else EXACT
        else:
            k = kind
        if k == EXACT:
            rules.append(Rule(category, pattern, path.rstrip("/") or "/", EXACT))
        else:
            root = path.rstrip("/") + "/"
            rules.append(Rule(category, pattern, root, TREE if subtree else k))
    return rules, True


def _section(doc: dict, name: str, source: str) -> dict:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, "must be a JSON object of category -> list of paths", source)
    for category, patterns in value.items():
        if not isinstance(patterns, list):
            raise ConfigError(f"{name}.{category}", "must be a list of paths", source)
        for i, pattern in enumerate(patterns):
            problem = _problem(pattern)
            if problem:
                raise ConfigError(f"{name}.{category}[{i}]", f"{pattern!r}: {problem}", source)
    return value


def parse(doc: dict, source: str) -> FimRules:
    """FimRules from a config document; ConfigError names the bad pattern."""
    paths = _section(doc, "file_paths", source)
    excludes = _section(doc, "exclude_paths", source)
    accesses = doc.get("file_accesses", [])
    if not isinstance(accesses, list) or not all(isinstance(a, str) for a in accesses):
        raise ConfigError("file_accesses", "must be a list of category names", source)
    for i, category in enumerate(accesses):
        if category not in paths:
            raise ConfigError(f"file_accesses[{i}]", f"{category!r} is not a category of file_paths",
                              source)
    rules = FimRules(accesses=frozenset(accesses))
    for name, target in (("file_paths", rules.includes), ("exclude_paths", rules.excludes)):
        for category, patterns in (paths if name == "file_paths" else excludes).items():
            for pattern in patterns:
                found, matched = _expand(category, pattern, subtree=name == "exclude_paths")
                target.extend(r for r in found if r not in target)
                if not matched:
                    rules.unmatched.append(pattern)
    return rules
