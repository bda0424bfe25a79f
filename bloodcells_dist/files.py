"""Writing files so that a reader sees the old file, no file, or the whole new one: never half of one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from .cli import UserError

MAX_YAML_VALUES = 10_000  # values in a user's YAML once aliases are expanded: a recipe holds a few hundred


@contextmanager
def atomic_path(path: Path | str, *, keep_suffix: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` once the block ends without an error,
    removed if it raises. It keeps the suffix for writers that need one (torch.export's .pt2) unless told not to
    (a shard's temporary file must not look like a shard)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}" if keep_suffix
                         else f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a link planted under the temporary name is removed, never written through
    try:
        yield tmp
        os.replace(tmp, path)  # replaces a symbolic link at `path` itself, not the file it points to
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, os.fdopen(open_own_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def open_own_file(path: Path | str, flags: int) -> int:
    """os.open of a file we write into a folder someone else may have filled: never through a symbolic link
    (O_NOFOLLOW: a planted link would have its target truncated) and only a regular file; UserError otherwise."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link: not written through; remove it") from None
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file (a device, socket or pipe?): remove it")
    return fd


def read_user_text(path: Path | str, what: str) -> str:
    """A text file a user handed us (a listing, a mapping), or a UserError saying why it cannot be one: unreadable,
    not UTF-8, or holding NUL bytes (a binary file)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not {what} (not UTF-8 text)") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if "\x00" in text:
        raise UserError(f"{path} is not {what} (it holds NUL bytes: a binary file?)")
    return text


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping."""


class StrictYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    raise DuplicateKey(f"key {key.value[:80]!r} given twice (lines {seen[key.tag, key.value]} and {line})")
                seen[key.tag, key.value] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (aliases share nodes: counted per use)."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # an alias to itself counts once, not forever
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = 1 + sum(expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def read_user_yaml(path: Path | str, what: str) -> object:
    """A YAML file a user handed us, or a UserError in one line: unreadable, not YAML, a key given twice, or
    aliases expanding past MAX_YAML_VALUES values (a "billion laughs" file, refused before it is built)."""
    return parse_user_yaml(read_user_text(path, what), f"{what} {path}")


def parse_user_yaml(text: str, where: str) -> object:
    """YAML text a user handed us (a file, a dataset card's header), or a UserError in one line starting with
    `where`: not YAML, a key given twice, or aliases expanding past MAX_YAML_VALUES values."""
    loader = StrictYamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node, {}) > MAX_YAML_VALUES:
            raise UserError(f"{where}: its aliases expand past {MAX_YAML_VALUES} values; write the values out")
        return None if node is None else loader.construct_document(node)
    except DuplicateKey as err:
        raise UserError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{where} is not valid YAML: {' '.join(str(err).split())[:300]}") from None
    finally:
        loader.dispose()


def remove_own_path(path: Path | str) -> None:
    """Remove what is at `path` in a folder someone else may have filled: a symbolic link itself (never what it
    points to, never a tree through it), a file, or a folder tree; nothing there is fine."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def write_json(path: Path | str, value: object, *, sort_keys: bool = False) -> None:
    """JSON (indented, newline-terminated), atomically."""
    write_atomic(path, json.dumps(value, indent=1, sort_keys=sort_keys) + "\n")
