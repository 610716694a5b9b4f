"""Run untrusted, model-written Python under OS isolation (bubblewrap), and score it against tests.

The code comes from a model asked to solve a task that cannot be solved honestly; under that pressure it
may print a fake success line, exit before the asserts run, rewrite the tests, read credentials, hang,
fork-bomb or flood the output. Every call returns a :class:`SandboxResult` (the parent never raises
because of what the child did), and a test counts as passed only when the runner saw it return.

Isolation is the kernel's, set up by ``bwrap`` (Debian/Ubuntu package ``bubblewrap``):

* ``--unshare-all``: own network namespace (no network, loopback included), own PID, IPC, UTS and mount
  namespaces; ``--die-with-parent`` and a process-group kill take the whole tree down at the timeout;
  ``--new-session`` (no terminal injection); ``--cap-drop ALL`` (root keeps only setuid/setgid, to drop
  itself to ``nobody`` before user code runs, since root is exempt from ``RLIMIT_NPROC``).
* A new, empty root: ``/usr`` (with the ``/bin``, ``/lib*`` links) and the interpreter's standard library
  read-only, its site-packages hidden under an empty tmpfs; a fresh ``/proc`` (this PID namespace only),
  a minimal ``/dev``, a tmpfs ``/tmp``; the task folder at ``/task``, the only writable host path. No home
  folder, caches, project or ``/etc`` secrets; the environment is cleared (``--clearenv``).
* ``python -I -S -B``: no site-packages, no user site, no ``PYTHON*`` variables, no bytecode.
* rlimits set by the child itself (:mod:`._runner`): address space, CPU seconds, file size, open files,
  processes, no core dumps. Output beyond a cap kills the run.

What is left to this module is what the OS cannot know: the ``test_*`` functions found with :mod:`ast`
(so the total cannot be faked), nonce-tagged reports (so printed results are ignored), and the digest of
the test file (so an edited test file is flagged). Where ``bwrap`` cannot run, :func:`require_bwrap`
raises a one-line :class:`~emotune.errors.ConfigError`; there is no weaker fallback.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from emotune.errors import ConfigError

__all__ = ["SandboxResult", "TestRun", "require_bwrap", "run_python", "run_tests"]

FILE_SIZE_LIMIT = 10 * 1024 * 1024
OPEN_FILES_LIMIT = 64
PROCESS_LIMIT = 64  # tasks (threads count) of the sandbox's uid; for a non-root parent, on top of its own
NOBODY = 65534  # the uid/gid a root parent's child drops to
TRUNCATION_MARKER = "[... truncated]"
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) and allow user namespaces"
_RUNNER = Path(__file__).with_name("_runner.py")


@dataclass
class SandboxResult:
    """What happened to one sandboxed program. ``returncode`` is None when the process was killed.

    ``status`` is one of ok, error, timeout, memory, output_limit, killed.
    """

    returncode: int | None
    stdout: str
    stderr: str
    status: str
    duration: float


@dataclass
class TestRun:
    """The outcome of :func:`run_tests`, from the runner's nonce-tagged reports.

    ``passed + failed + errors == total``. A test *failed* when its body raised (``SystemExit`` included); it
    is an *error* when it could not run or was never reported (the solution did not import, the function was
    replaced, the process died first). ``tampering`` says why ``tests_modified`` is True.
    """

    __test__ = False  # not a pytest test class

    passed: int
    failed: int
    errors: int
    total: int
    tests_modified: bool
    result: SandboxResult
    outcomes: dict[str, str] = field(default_factory=dict)
    tampering: list[str] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total and not self.tests_modified


def run_python(
    code: str,
    *,
    files: dict[str, str] | None = None,
    timeout: float = 10.0,
    memory_mb: int = 512,
    max_output: int = 20_000,
    cpu_seconds: int | None = None,
) -> SandboxResult:
    """Run ``code`` as ``/task/main.py`` (``files``, relative paths, beside it) in a fresh sandbox.

    Raises ValueError only for a bad ``files`` path and ConfigError when bubblewrap cannot run.
    """
    config = {"mode": "script", "source": code}
    result, _ = _execute(
        {**(files or {}), "main.py": code}, config, timeout, memory_mb, max_output, cpu_seconds, after=None
    )
    return result


def run_tests(solution: str, tests: str, *, timeout: float = 10.0, memory_mb: int = 512) -> TestRun:
    """Save ``solution`` as solution.py and ``tests`` as test_solution.py, and run every ``test_*`` function.

    The tests are plain functions with ``assert`` statements that import from ``solution``.
    """
    names, decorated = _test_functions(tests)
    config = {"mode": "tests", "source": tests, "names": names, "decorated": decorated}
    expected = hashlib.sha256(tests.encode("utf-8", "surrogatepass")).hexdigest()
    digest: list[str | None] = []
    result, reports = _execute(
        {"solution.py": solution, "test_solution.py": tests},
        config,
        timeout,
        memory_mb,
        20_000,
        None,
        after=lambda folder: digest.append(_file_digest(folder / "test_solution.py")),
    )
    outcomes: dict[str, str] = {}
    tampering: list[str] = []
    for r in reports:
        if r.get("type") == "test" and r.get("name") in names:
            outcomes[r["name"]] = r["outcome"] if r.get("outcome") in ("passed", "failed", "error") else "error"
        elif r.get("type") == "tamper" and isinstance(r.get("reason"), str):
            tampering.append(r["reason"])
    if not digest or digest[0] != expected:
        tampering.append("test_solution.py changed on disk" if digest and digest[0] else "test_solution.py is gone")
    final = {name: outcomes.get(name, "error") for name in names}
    counts = {kind: sum(o == kind for o in final.values()) for kind in ("passed", "failed", "error")}
    tampering = list(dict.fromkeys(tampering))
    return TestRun(
        counts["passed"], counts["failed"], counts["error"], len(names), bool(tampering), result, final, tampering
    )


@functools.lru_cache(maxsize=1)
def require_bwrap() -> str:
    """The path of a ``bwrap`` that can set up this module's namespaces here; ConfigError otherwise."""
    path = shutil.which("bwrap")
    if path is None:
        raise ConfigError(f"generation mode runs model-written code under bubblewrap, and `bwrap` is not on PATH: "
                          f"{INSTALL_HINT}.")
    probe = subprocess.run(
        [path, *_bwrap_args(), "--", _python(), "-I", "-S", "-c", "pass"],
        capture_output=True,
        env=_bwrap_env(),
        timeout=60,
    )
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise ConfigError(f"bubblewrap at {path} cannot create the sandbox here ({why[0]}): {INSTALL_HINT}.")
    return path


# --------------------------------------------------------------------------------------------------
# Parent side


def _test_functions(tests: str) -> tuple[list[str], list[str]]:
    """Top-level ``def test*`` names in definition order, and the decorated ones."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError):
        return [], []
    found = {n.name: bool(n.decorator_list) for n in tree.body if isinstance(n, ast.FunctionDef)}
    names = [name for name in found if name.startswith("test")]
    return names, [name for name in names if found[name]]


def _file_digest(path: Path) -> str | None:
    """sha256 of a regular file, not following symlinks nor blocking on FIFOs; None when it is not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            return hashlib.sha256(fh.read(FILE_SIZE_LIMIT + 1)).hexdigest() if S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None


def _python() -> str:
    return os.path.realpath(sys.executable)


def _python_mounts() -> list[str]:
    """Read-only binds of the interpreter, its shared library and its stdlib (outside /usr), site-packages
    hidden: the child gets the standard library and nothing of this environment's packages."""
    paths = {_python(), sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    if os.path.isfile(lib):
        paths.add(os.path.realpath(lib))
    outside = sorted(p for p in paths if not p.startswith("/usr/"))
    # bwrap would copy each parent's host mode (a 0700 home would lock nobody out): create them 0755
    parents = sorted({str(a) for p in outside for a in Path(p).parents if str(a) != "/"}, key=len)
    args = [x for a in parents for x in ("--perms", "0755", "--dir", a)]
    for p in outside:
        args += ["--ro-bind", p, p]
    hidden = {sysconfig.get_path(k, vars=v) for k in ("purelib", "platlib") for v in (None, {"base": sys.base_prefix})}
    for p in sorted(hidden):
        if os.path.isdir(p) and any(p.startswith(s + os.sep) for s in paths | {"/usr"}):
            args += ["--tmpfs", p]
    return args


def _bwrap_args() -> list[str]:
    args = ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if os.geteuid() == 0:
        # --unshare-all without the user namespace: uid 0 in a user namespace is host root to the kernel, and
        # host root is exempt from RLIMIT_NPROC. Instead the runner drops to nobody with the two capabilities
        # kept here (NO_NEW_PRIVS, which bwrap sets, keeps it dropped), and nobody's processes are counted.
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all"]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", *_python_mounts()]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/task", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    args += ["--clearenv", *(x for k, v in env.items() for x in ("--setenv", k, v))]
    return args


def _bwrap_env() -> dict[str, str]:
    """bwrap's own environment: its PID-1 helper inside the sandbox keeps it, so none of ours goes in."""
    return {"PATH": os.environ.get("PATH") or os.defpath, "LANG": "C.UTF-8"}


def _limits(memory_mb: int, cpu_seconds: int) -> dict[str, tuple[int, int]]:
    nproc = PROCESS_LIMIT
    if os.geteuid() != 0:  # RLIMIT_NPROC counts every task of the uid, the parent's own included
        nproc += sum(len(os.listdir(f"/proc/{p}/task")) for p in os.listdir("/proc") if _mine(p))
    return {
        "RLIMIT_AS": (memory_mb << 20, memory_mb << 20),
        "RLIMIT_CPU": (cpu_seconds, cpu_seconds + 1),
        "RLIMIT_FSIZE": (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT),
        "RLIMIT_NOFILE": (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT),
        "RLIMIT_NPROC": (nproc, nproc),
        "RLIMIT_CORE": (0, 0),
    }


def _mine(pid: str) -> bool:
    try:
        return pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == os.getuid()
    except OSError:
        return False


def _safe_relative(path: str) -> str:
    norm = os.path.normpath(path)
    if not path or os.path.isabs(path) or norm in (".", "..") or norm.startswith(".." + os.sep):
        raise ValueError(f"sandbox files must have relative paths inside the folder, got {path!r}")
    return norm


def _execute(
    files: dict[str, str],
    config: dict[str, Any],
    timeout: float,
    memory_mb: int,
    max_output: int,
    cpu_seconds: int | None,
    after: Any,
) -> tuple[SandboxResult, list[dict[str, Any]]]:
    """Write ``files`` into a fresh folder, run the runner on it under bwrap, and collect output and reports."""
    bwrap = require_bwrap()
    relative = {_safe_relative(path): text for path, text in files.items()}
    root = os.geteuid() == 0
    nonce = secrets.token_hex(16)
    cpu = cpu_seconds if cpu_seconds is not None else max(1, math.ceil(timeout)) + 1
    with tempfile.TemporaryDirectory(prefix="emotune-sandbox-") as tmp, tempfile.TemporaryFile() as reports, \
            tempfile.TemporaryFile() as stdin:
        folder = Path(tmp)
        for path, text in relative.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(text.encode("utf-8", "surrogatepass"))
        if root:  # the child drops to nobody, which must own its folder
            for dirpath, _, names in os.walk(folder):
                for p in [dirpath, *(os.path.join(dirpath, n) for n in names)]:
                    os.chown(p, NOBODY, NOBODY)
            folder.chmod(0o755)  # bwrap enters it as root without CAP_DAC_OVERRIDE
        payload = dict(config, nonce=nonce, report_fd=reports.fileno(), limits=_limits(memory_mb, cpu))
        payload["drop_to"] = [NOBODY, NOBODY] if root else None
        stdin.write(json.dumps(payload).encode("utf-8", "surrogatepass"))
        stdin.seek(0)
        argv = [bwrap, *_bwrap_args(), "--bind", str(folder), "/task", "--chdir", "/task", "--"]
        argv += [_python(), "-I", "-S", "-B", "-c", _RUNNER.read_text()]
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_bwrap_env(),
            start_new_session=True,
            pass_fds=(reports.fileno(),),
        )
        kept, kill_reason = _collect(proc, start + timeout, max_output)
        duration = time.monotonic() - start
        if after is not None:
            after(folder)
        reports.seek(0)
        parsed = _parse_reports(reports.read(FILE_SIZE_LIMIT), nonce)
        _make_removable(folder)
    return _result(proc.returncode, kept, kill_reason, parsed, duration, timeout, max_output), parsed


def _collect(
    proc: subprocess.Popen[bytes], deadline: float, max_output: int
) -> tuple[dict[str, tuple[bytes, bool]], str | None]:
    """Read stdout/stderr until both close, the deadline passes or too much was written; then kill the tree.

    Killing bwrap's process group kills its PID-1 helper (``--die-with-parent``), and with it every process
    of the sandbox's PID namespace, however it daemonised.
    """
    assert proc.stdout is not None and proc.stderr is not None
    cap = max_output * 4 + 4  # bytes kept per stream: enough for max_output UTF-8 characters
    drain_cap = max(4 << 20, 50 * max_output)  # bytes read in all before the run is killed
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    seen = {"stdout": 0, "stderr": 0}
    kill_reason: str | None = None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
        selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while selector.get_map() and kill_reason is None:
            left = deadline - time.monotonic()
            if left <= 0:
                kill_reason = "timeout"
                break
            for key, _ in selector.select(min(left, 0.5)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                seen[key.data] += len(chunk)
                kept[key.data] += chunk[: max(0, cap - len(kept[key.data]))]
                if sum(seen.values()) > drain_cap:
                    kill_reason = "output_limit"
    if kill_reason is None:  # the pipes closed: wait for the exit, or until the deadline
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_reason = "timeout"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    return {k: (bytes(v), seen[k] > len(v)) for k, v in kept.items()}, kill_reason


def _parse_reports(raw: bytes, nonce: str) -> list[dict[str, Any]]:
    """The runner's nonce-tagged JSON lines; anything without the nonce (printed forgeries, garbage) is ignored."""
    tag = (nonce + " ").encode()
    found = []
    for line in raw.split(b"\n"):
        if line.startswith(tag):
            try:
                payload = json.loads(line[len(tag) :])
            except ValueError:
                continue
            if isinstance(payload, dict):
                found.append(payload)
    return found


def _make_removable(folder: Path) -> None:
    """The child may have made directories unwritable; a non-root parent could not remove them then."""
    for dirpath, dirnames, _ in os.walk(folder):
        for name in dirnames:
            try:
                os.chmod(os.path.join(dirpath, name), 0o700, follow_symlinks=False)
            except OSError:
                pass


def _result(
    rc: int,
    kept: dict[str, tuple[bytes, bool]],
    kill_reason: str | None,
    reports: list[dict[str, Any]],
    duration: float,
    timeout: float,
    max_output: int,
) -> SandboxResult:
    stdout, stderr = (_decode(*kept[k], max_output) for k in ("stdout", "stderr"))
    memory = any(r.get("type") == "memory" for r in reports) or "MemoryError" in stderr[-2000:]
    returncode: int | None = rc
    if kill_reason is not None:
        status, returncode = kill_reason, None
        note = f"timed out after {timeout:g} s" if kill_reason == "timeout" else "wrote too much output"
        stderr += f"\n[sandbox] {note}: the sandbox was killed"
    elif rc >= 128 or rc < 0:  # bwrap passes a signal death on as 128 + signal number
        number = rc - 128 if rc >= 128 else -rc
        returncode = None
        status = "timeout" if number == signal.SIGXCPU else "memory" if memory else "killed"
        stderr += f"\n[sandbox] killed by {_signal_name(number)}"
    else:
        status = "memory" if memory and rc != 0 else "ok" if rc == 0 else "error"
    return SandboxResult(returncode, stdout, stderr, status, duration)


def _decode(data: bytes, truncated: bool, max_output: int) -> str:
    text = data.decode("utf-8", "replace")
    if truncated or len(text) > max_output:
        text = text[:max_output] + "\n" + TRUNCATION_MARKER
    return text


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
