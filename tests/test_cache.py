"""The on-disk kernel cache: what the key covers (issue 8 A16), what attnc trusts there (A17), and
file names for long spec names (A12)."""
import hashlib
import importlib.util
import inspect
import linecache
import marshal
import os
import re
import signal
import stat
import struct
import warnings

import pytest
import torch

import attnc
from attnc.codegen import cache
from attnc.ir.printer import format_ir
from attnc.settings import settings

settings()  # interpreter mode decided before the cache imports Triton (redundant once A18 lands)
CAUSAL = "attention {name}(N) {{ q, kv = seq(N) mask = causal }}"


def _ir(text):
    return attnc.parse(text).ir


def _qkv(n, device, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, d, generator=g).to(device) for _ in range(3)]


def _check_runs(text, device, n=16, **params):
    """Compile `text` (N defaults to n), run it on the Triton backend and compare with the reference."""
    params = params or {"N": n}
    fn = attnc.compile(text, tiles=(16, 16), **params)
    ref = attnc.compile(text, backend="reference", **params)
    q, k, v = _qkv(n, device)
    with torch.no_grad():
        out = fn(q, k, v)
        expect = ref(q.cpu().double(), k.cpu().double(), v.cpu().double())
    assert (out.cpu().double() - expect).abs().max().item() < 1e-4
    return fn


def _with_checksum(body):
    """An entry in the cache's file format: a checksum line of the body, then the body."""
    return f"# attnc-checksum: {hashlib.sha256(body.encode()).hexdigest()}\n{body}"


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- A16: the key covers everything the file depends on ---------------------------------------
ONE = "attention cited(N) {\n    q, kv = seq(N)\n    mask = causal\n}\n"
TWO = ("attention cited(N) {\n    # one more comment line moves the mask down\n"
       "    q, kv = seq(N)\n    mask = causal\n}\n")


def _mask_line(text):
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.lstrip().startswith("mask"))


def test_key_covers_the_spec_lines_the_kernel_cites(tmp_path):
    one, two = _ir(ONE), _ir(TWO)
    assert format_ir(one) == format_ir(two)  # the IR alone cannot tell them apart
    path1, src1, _ = cache.kernel_file(one, tmp_path)
    path2, src2, hit = cache.kernel_file(two, tmp_path)
    assert not hit and path1 != path2
    assert re.search(rf"\bline {_mask_line(ONE)}\b", src1)
    assert re.search(rf"\bline {_mask_line(TWO)}\b", src2)
    assert path1.read_bytes() != path2.read_bytes()
    assert re.search(rf"\bline {_mask_line(TWO)}\b", path2.read_text())


def test_compiled_kernel_cites_its_own_spec_lines():
    a = attnc.compile(ONE.replace("cited", "cited_c"), N=8)
    b = attnc.compile(TWO.replace("cited", "cited_c"), N=8)
    assert a.compiled.kernel_path != b.compiled.kernel_path
    assert re.search(rf"\bline {_mask_line(TWO)}\b", b.kernel_source)
    assert b.compiled.kernel_path.read_text().endswith(b.kernel_source)


def test_key_covers_the_triton_version(tmp_path, monkeypatch):
    ir = _ir(CAUSAL.format(name="c"))
    path1, _, _ = cache.kernel_file(ir, tmp_path)
    monkeypatch.setattr(cache, "_triton_version", lambda: "0.0.0-other")
    path2, _, hit = cache.kernel_file(ir, tmp_path)
    assert path1 != path2 and not hit


# -- A17: attnc runs only what it wrote for the key -------------------------------------------
def test_directories_and_files_are_private(tmp_path):
    old = os.umask(0)  # the modes must not depend on a lenient umask
    try:
        mod, path, _ = cache.load_module(_ir(CAUSAL.format(name="private")), tmp_path / "root")
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    d = path.parent
    while d != tmp_path:
        assert _mode(d) == 0o700, d
        d = d.parent
    # the module was compiled from text, not imported: no bytecode was written to be read back
    assert not list((tmp_path / "root").rglob("__pycache__"))
    assert hasattr(mod, "attnc_fwd")


@pytest.mark.parametrize("level", [0, 1, 2])  # the cache root, kernels/, the shard directory
def test_refuses_a_directory_others_can_write(tmp_path, monkeypatch, level):
    ir = _ir(CAUSAL.format(name="shared"))
    path, _, _ = cache.kernel_file(ir, tmp_path / "root")
    target = [tmp_path / "root", path.parent.parent, path.parent][level]
    someone_else = os.stat(target).st_uid + 1
    monkeypatch.setattr(os, "geteuid", lambda: someone_else)
    target.chmod(0o755)  # another user's, but only they can write: entries are checked anyway
    assert cache.kernel_file(ir, tmp_path / "root")[2]
    target.chmod(0o775)
    with pytest.raises(attnc.AttncError, match="writable by other users") as err:
        cache.kernel_file(ir, tmp_path / "root")
    assert "ATTNC_CACHE_DIR" in err.value.hint
    target.chmod(0o700)


def test_a_file_as_cache_root_is_an_attnc_error(tmp_path):
    (tmp_path / "root").write_text("not a directory")
    with pytest.raises(attnc.AttncError, match="ATTNC_CACHE_DIR"):
        cache.kernel_file(_ir(CAUSAL.format(name="c")), tmp_path / "root")


def _fifo(path, expected):
    os.mkfifo(path)


def _directory(path, expected):
    path.mkdir()
    (path / "inside.py").write_bytes(expected)


def _symlink_to_valid_copy(path, expected):
    (path.parent.parent / "elsewhere.py").write_bytes(expected)
    path.symlink_to(path.parent.parent / "elsewhere.py")


def _other_source_with_its_checksum(path, expected):
    body = "raise SystemExit('planted')\n"
    path.write_text(_with_checksum(body))


DAMAGE = {
    "garbage": lambda p, e: p.write_bytes(b"\x00\xff this is not python (\n"),
    "bad_checksum": lambda p, e: p.write_bytes(e.replace(b"import triton", b"import trit0n", 1)),
    "truncated": lambda p, e: p.write_bytes(e[: len(e) // 2]),
    "empty": lambda p, e: p.write_bytes(b""),
    "longer": lambda p, e: p.write_bytes(e + b"\nraise SystemExit('planted')\n"),
    "other_source_with_its_checksum": _other_source_with_its_checksum,
    "fifo": _fifo,
    "directory": _directory,
    "symlink_to_valid_copy": _symlink_to_valid_copy,
    "dangling_symlink": lambda p, e: p.symlink_to(p.parent / "nowhere.py"),
}


class Hung(Exception):
    pass


@pytest.fixture
def no_hang():
    """Fail instead of hanging (opening a FIFO for reading blocks until a writer comes)."""
    def fail(*_):
        raise Hung("the cache blocked")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_entry_is_rebuilt(tmp_path, damage, no_hang):
    ir = _ir(CAUSAL.format(name="damaged"))
    root = tmp_path / "root"
    path, source, _ = cache.kernel_file(ir, root)
    expected = path.read_bytes()
    path.unlink()
    DAMAGE[damage](path, expected)
    with pytest.warns(UserWarning, match="corrupted"):
        path2, source2, hit = cache.kernel_file(ir, root)
    assert (path2, source2, hit) == (path, source, False)
    assert stat.S_ISREG(os.lstat(path).st_mode) and _mode(path) == 0o600
    assert path.read_bytes() == expected
    if damage == "symlink_to_valid_copy":  # replaced the link, not written through it
        assert (tmp_path / "root" / "kernels" / "elsewhere.py").read_bytes() == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.kernel_file(ir, root)[2]  # the rebuilt entry is reused silently
    mod, _, _ = cache.load_module(ir, root)
    assert hasattr(mod, "attnc_fwd")


@pytest.mark.parametrize("thing", ["file", "fifo", "dangling_symlink"])
def test_a_non_directory_where_a_cache_directory_belongs_is_replaced(tmp_path, thing, no_hang):
    ir = _ir(CAUSAL.format(name="shard"))
    path, _, _ = cache.kernel_file(ir, tmp_path)
    for f in path.parent.iterdir():
        f.unlink()
    path.parent.rmdir()
    {"file": lambda d: d.write_text("not a directory"), "fifo": os.mkfifo,
     "dangling_symlink": lambda d: d.symlink_to(tmp_path / "nowhere")}[thing](path.parent)
    path2, _, hit = cache.kernel_file(ir, tmp_path)
    assert path2 == path and not hit and path.is_file()
    assert stat.S_ISDIR(os.lstat(path.parent).st_mode) and _mode(path.parent) == 0o700


def _planted(marker):
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def _pyc_for(py, code_text):
    """Bytecode Python's importer would take for `py` (its mtime and size match) running code_text."""
    st = os.stat(py)
    code = compile(code_text, str(py), "exec")
    header = importlib.util.MAGIC_NUMBER + struct.pack("<III", 0, int(st.st_mtime) & 0xFFFFFFFF,
                                                       st.st_size & 0xFFFFFFFF)
    pyc = importlib.util.cache_from_source(str(py))
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    with open(pyc, "wb") as fh:
        fh.write(header + marshal.dumps(code))


@pytest.mark.parametrize("plant", ["wrong_checksum", "own_checksum", "stale_pyc"])
def test_planted_files_never_run(tmp_path, plant, device):
    text = CAUSAL.format(name=f"planted_{plant}")
    path, _, _ = cache.kernel_file(_ir(text), settings().cache_dir)
    marker = tmp_path / "ran"
    if plant == "wrong_checksum":
        path.write_text(f"# attnc-checksum: {'0' * 64}\n{_planted(marker)}")
    elif plant == "own_checksum":
        path.write_text(_with_checksum(_planted(marker)))
    else:  # a valid entry, and beside it bytecode that Python's importer would run in its place
        _pyc_for(path, _planted(marker))
        spec = importlib.util.spec_from_file_location("attnc_test_plain_import", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert marker.exists()  # a plain import does run the planted bytecode
        marker.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the planted .py entries are reported as corrupted
        _check_runs(text, device)
    assert not marker.exists()


def test_inspect_sees_the_text_that_runs(tmp_path):
    mod, path, source = cache.load_module(_ir(CAUSAL.format(name="inspected")), tmp_path)
    fn = mod.visible.fn
    before = inspect.getsource(fn)
    assert before in source
    path.write_text("# changed on disk after loading\n" * 500)
    linecache.checkcache(str(path))
    assert inspect.getsource(fn) == before


# -- A12: long names --------------------------------------------------------------------------
def test_long_spec_name_runs(device):
    name = "x" * 300
    fn = _check_runs(CAUSAL.format(name=name), device)
    path = fn.compiled.kernel_path
    assert len(path.name) <= 80 and path.name.startswith("x" * 40)
    assert name in fn.kernel_source  # bounded in the file name only


def test_long_parameter_name_runs(device):
    p = "P" * 300
    _check_runs(f"attention long_param({p}) {{ q, kv = seq({p}) mask = causal }}", device, **{p: 16})


def test_names_alike_in_their_first_characters_get_their_own_entries(tmp_path):
    a = cache.kernel_file(_ir(CAUSAL.format(name="y" * 300)), tmp_path)
    b = cache.kernel_file(_ir(CAUSAL.format(name="y" * 299 + "z")), tmp_path)
    assert a[0] != b[0] and a[1] != b[1]
    assert a[0].read_text().endswith(a[1]) and b[0].read_text().endswith(b[1])
