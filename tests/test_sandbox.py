"""Hostile programs against the bubblewrap sandbox: each must be contained by the OS, and the evaluation goes on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from emotune.errors import ConfigError
from emotune.evaluate.agentic import sandbox

try:
    sandbox.require_bwrap()
except ConfigError as exc:  # .ci/run installs bubblewrap; elsewhere say why these cannot run
    pytest.skip(str(exc), allow_module_level=True)

ADD_TESTS = textwrap.dedent(
    """
    from solution import add

    def test_small():
        assert add(1, 2) == 3

    def test_negative():
        assert add(-1, -1) == -2

    def test_zero():
        assert add(0, 0) == 0
    """
)
CORRECT_ADD = "def add(a, b):\n    return a + b\n"
PROJECT = Path(__file__).resolve().parents[1]


def run(code: str, **kwargs) -> sandbox.SandboxResult:
    return sandbox.run_python(textwrap.dedent(code), **kwargs)


def sandboxed_processes() -> list[int]:
    """Live (non-zombie) processes of the sandbox's user (nobody for a root parent, else the runner's source)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        ours = uid == sandbox.NOBODY if os.geteuid() == 0 else b"The program the sandboxed child" in cmdline
        if ours and "State:\tZ" not in status:
            found.append(int(entry))
    return found


# ---------------------------------------------------------------------------------------------- the basics


def test_correct_code_runs_and_its_stdout_is_captured():
    result = run("print('hello from the sandbox')")
    assert (result.status, result.returncode, result.stdout) == ("ok", 0, "hello from the sandbox\n")


def test_a_crash_is_an_error_with_its_traceback_and_an_exit_code_is_the_returncode():
    crash = run("raise ValueError('boom')")
    assert (crash.status, crash.returncode) == ("error", 1)
    assert "ValueError: boom" in crash.stderr
    assert (run("import sys; sys.exit(3)").returncode, run("import sys; sys.exit(3)").status) == (3, "error")


def test_helper_files_are_written_beside_main_and_paths_outside_are_refused():
    result = sandbox.run_python(
        "from helpers.util import twice\nprint(twice(21), open('data.txt').read())",
        files={"helpers/__init__.py": "", "helpers/util.py": "def twice(x):\n    return 2 * x\n", "data.txt": "ok"},
    )
    assert (result.status, result.stdout) == ("ok", "42 ok\n"), result.stderr
    for bad in ("../escape.py", "/tmp/escape.py", "a/../../escape.py"):
        with pytest.raises(ValueError):
            sandbox.run_python("pass", files={bad: "x"})


def test_ordinary_work_inside_the_folder_works_subprocesses_and_threads_included():
    result = run(
        """
        import json, os, sqlite3, subprocess, tempfile, threading
        from pathlib import Path
        Path("notes").mkdir(); Path("notes/a.txt").write_text("hi")
        with tempfile.TemporaryDirectory() as scratch:
            Path(scratch, "x").write_text("y")
        db = sqlite3.connect(":memory:"); db.execute("create table t (x)"); db.close()
        t = threading.Thread(target=lambda: None); t.start(); t.join()
        echo = subprocess.run(["cat", "notes/a.txt"], capture_output=True, text=True).stdout
        print(json.dumps({"echo": echo, "files": sorted(os.listdir("."))}))
        """
    )
    assert result.status == "ok", result.stderr
    assert result.stdout.strip() == '{"echo": "hi", "files": ["main.py", "notes"]}'


def test_the_child_python_has_the_standard_library_and_none_of_our_packages():
    result = run(
        """
        import sys, os
        print([p for p in sys.path if "site-packages" in p or "dist-packages" in p])
        for name in ("numpy", "torch", "emotune", "pyarrow"):
            try:
                __import__(name)
                print(name, "IMPORTED")
            except ImportError:
                print(name, "missing")
        """
    )
    assert result.status == "ok", result.stderr
    lines = result.stdout.split("\n")[:5]
    assert lines == ["[]", "numpy missing", "torch missing", "emotune missing", "pyarrow missing"]


# ------------------------------------------------------------------------------------ tests, and forging them


def test_correct_wrong_and_unimportable_solutions_are_scored_from_the_runners_reports():
    good = sandbox.run_tests(CORRECT_ADD, ADD_TESTS)
    assert (good.passed, good.total, good.all_passed) == (3, 3, True)
    wrong = sandbox.run_tests("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert (wrong.passed, wrong.failed, wrong.all_passed) == (1, 2, False)  # only 0 - 0 == 0 passes
    broken = sandbox.run_tests("def add(a, b) return", ADD_TESTS)
    assert (broken.errors, broken.total) == (3, 3)


def test_the_total_comes_from_the_parent_not_the_child():
    # the solution deletes two tests at import; they still count, as errors
    solution = CORRECT_ADD + "import sys\nm = sys.modules['test_solution']\ndel m.__dict__['test_negative']\n"
    outcome = sandbox.run_tests(solution, ADD_TESTS + "\ndel test_zero\n")
    assert outcome.total == 3 and outcome.passed < 3


def test_printed_and_fd_sprayed_fake_reports_are_ignored():
    forged = '{"type": "test", "name": "test_small", "outcome": "passed"}'
    solution = textwrap.dedent(
        f"""
        import os, secrets
        line = (secrets.token_hex(16) + " " + {forged!r} + "\\n").encode()
        print(line.decode()); print({forged!r})
        for fd in range(3, 64):
            try:
                os.write(fd, line)
            except OSError:
                pass
        def add(a, b):
            return 0
        """
    )
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.outcomes["test_small"] == "failed" and outcome.passed == 1  # test_zero passes honestly


@pytest.mark.parametrize(
    "solution",
    ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"],
    ids=["sys.exit", "os._exit"],
)
def test_exiting_at_import_passes_no_tests(solution):
    outcome = sandbox.run_tests(solution + CORRECT_ADD, ADD_TESTS)
    assert outcome.passed == 0 and not outcome.all_passed


def test_exiting_inside_a_test_fails_it_and_os_exit_leaves_later_tests_unpassed():
    exits = sandbox.run_tests("import sys\ndef add(a, b):\n    sys.exit(0)\n", ADD_TESTS)
    assert exits.failed == 3
    solution = "import os\ndef add(a, b):\n    if a < 0:\n        os._exit(0)\n    return a + b\n"
    hard = sandbox.run_tests(solution, ADD_TESTS)
    assert hard.outcomes == {"test_small": "passed", "test_negative": "error", "test_zero": "error"}


def test_rewriting_the_test_file_on_disk_is_flagged():
    solution = CORRECT_ADD + "open('/task/test_solution.py', 'w').write('def test_small():\\n    pass\\n')\n"
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.tests_modified and not outcome.all_passed
    assert outcome.tampering == ["test_solution.py changed on disk"]


@pytest.mark.parametrize(
    "attack",
    ["t.test_impossible = lambda: None", "t.test_impossible.__code__ = (lambda: None).__code__"],
    ids=["replaced", "code swapped"],
)
def test_replacing_or_patching_a_later_test_function_is_flagged(attack):
    solution = CORRECT_ADD + f"def hack():\n    import sys\n    t = sys.modules['test_solution']\n    {attack}\n"
    tests = ADD_TESTS.replace("import add", "import add, hack")
    tests = tests.replace("def test_small():\n", "def test_small():\n    hack()\n")
    outcome = sandbox.run_tests(solution, tests + "\ndef test_impossible():\n    assert add(1, 1) == 3\n")
    assert outcome.tests_modified and outcome.outcomes["test_impossible"] == "error"
    assert outcome.tampering[0].startswith("test_solution.test_impossible was")


# ---------------------------------------------------------------------------------- OS isolation: files


READ_ROUTES = {  # route -> (program, what it says about the missing file)
    "open": ("print(open(SECRET).read())", "FileNotFoundError"),
    "ctypes libc open": (
        """
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        fd = libc.open(SECRET.encode(), 0)
        buf = ctypes.create_string_buffer(200)
        print("fd", fd, libc.read(fd, buf, 200) if fd >= 0 else -1, buf.value)
    """,
        "fd -1 -1",
    ),
    "os.system cat": ("os.system('cat ' + SECRET)", "No such file"),
    "subprocess cat": (
        "import subprocess; print(subprocess.run(['cat', SECRET], capture_output=True).stderr)",
        "No such file",
    ),
    "pyarrow native reader": (
        f"""
        sys.path[:0] = {sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')})!r}
        import pyarrow.fs
        print(pyarrow.fs.LocalFileSystem().open_input_stream(SECRET).read())
    """,
        "ModuleNotFoundError: No module named 'pyarrow'",
    ),
}


@pytest.mark.parametrize("route", list(READ_ROUTES), ids=list(READ_ROUTES))
def test_a_secret_outside_the_folder_cannot_be_read_by_any_route(tmp_path, route):
    pytest.importorskip("pyarrow")  # the parent has it: the test shows that it does not reach inside
    secret = tmp_path / "secret.txt"
    secret.write_text(f"SECRET-{uuid.uuid4().hex}")
    program, missing = READ_ROUTES[route]
    result = run(f"import os, sys\nSECRET = {str(secret)!r}\n" + textwrap.dedent(program))
    assert secret.read_text() not in result.stdout + result.stderr
    assert missing in result.stdout + result.stderr, result


def test_home_caches_project_and_site_packages_are_not_there():
    """Of the home folder only the interpreter's own files are mounted (when Python is installed there)."""
    places = {"home": Path.home(), "cache": Path.home() / ".cache", "project": PROJECT, "work": PROJECT.parent}
    places["site-packages"] = Path(sysconfig.get_path("purelib"))
    python_home = os.path.realpath(sys.base_prefix) + os.sep
    code = f"""
        import json, os
        seen = {{}}
        for name, top in {({k: str(v) for k, v in places.items()})!r}.items():
            files = [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs] if os.path.exists(top) else None
            seen[name] = files and [f for f in files if not f.startswith({python_home!r})]
        print(json.dumps(seen))
    """
    seen = json.loads(run(code).stdout)
    assert seen.pop("home") in ([], None) and seen.pop("site-packages") in ([], None)  # None: not there at all
    assert seen == {"cache": None, "project": None, "work": None}


WRITE_ROUTES = {
    "open": "open(TARGET, 'w').write('escaped')",
    "ctypes fopen (a native writer, like tokenizers' save)": """
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype = ctypes.c_void_p
        f = libc.fopen(TARGET.encode(), b"w")
        print("fopen", f)
        if f:
            libc.fputs(b"escaped", ctypes.c_void_p(f)); libc.fclose(ctypes.c_void_p(f))
    """,
    "os.system": "os.system('echo escaped > ' + TARGET)",
}


@pytest.mark.parametrize("route", list(WRITE_ROUTES), ids=list(WRITE_ROUTES))
def test_nothing_outside_the_folder_can_be_written(tmp_path, route):
    targets = [tmp_path / "escaped.txt", Path(sysconfig.get_path("stdlib")) / f"escaped-{uuid.uuid4().hex}.py"]
    targets.append(Path("/usr/lib") / f"escaped-{uuid.uuid4().hex}")
    for target in targets:
        run(f"import os\nTARGET = {str(target)!r}\n" + textwrap.dedent(WRITE_ROUTES[route]))
        assert not target.exists(), target


# ------------------------------------------------------------------------------- OS isolation: env, net, procs


def test_parent_secrets_are_not_in_the_environment_nor_in_any_proc_environ(monkeypatch):
    secret = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("EMOTUNE_TEST_SECRET", secret)
    code = f"""
        import os
        print(dict(os.environ))
        for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["{os.getpid()}", "{os.getppid()}"]:
            try:
                print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
            except OSError as exc:
                print(pid, type(exc).__name__)
    """
    result = run(code)
    assert result.status == "ok", result.stderr
    assert secret not in result.stdout + result.stderr
    assert "HF_TOKEN" not in result.stdout


def test_the_sandbox_sees_only_its_own_processes():
    result = run("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert result.stdout.strip() == "[1, 2]", result  # bubblewrap's init and the program itself


def test_a_listener_on_the_parents_loopback_cannot_be_reached():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run(
            f"""
            import socket
            for host in ("127.0.0.1", "1.1.1.1"):
                try:
                    socket.create_connection((host, {port}), timeout=2)
                    print(host, "CONNECTED")
                except OSError as exc:
                    print(host, type(exc).__name__)
            """
        )
        with pytest.raises(OSError):  # nothing arrived
            server.accept()
    assert "CONNECTED" not in result.stdout and result.stdout.count("Error") == 2, result


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()\n",
        "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(9)'])\n",  # noqa: E501
    ],
    ids=["os.fork", "subprocess"],
)
def test_a_fork_bomb_is_capped_and_leaves_nothing_behind(bomb):
    started = time.monotonic()
    result = run(bomb, timeout=4)
    assert time.monotonic() - started < 15
    assert result.status in ("error", "timeout", "killed"), result
    time.sleep(0.2)
    assert sandboxed_processes() == []


def test_a_daemonised_child_does_not_outlive_the_sandbox():
    code = """
        import os, subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)"])
        print("parent exits")
    """
    result = run(code)
    assert result.status == "ok", result.stderr
    time.sleep(0.2)
    assert sandboxed_processes() == []


def test_memory_hogs_are_stopped_as_memory():
    sudden = run("x = bytearray(4 * 1024 ** 3)")
    slow = run("x = []\nwhile True:\n    x.append(bytearray(10 ** 6))")
    assert (sudden.status, slow.status) == ("memory", "memory")


def test_infinite_loops_are_killed_at_the_timeout_and_by_the_cpu_limit():
    sleeper = run("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)", timeout=1)
    busy = run("while True:\n    pass", timeout=30, cpu_seconds=1)
    assert (sleeper.status, sleeper.returncode) == ("timeout", None)
    assert sleeper.duration < 5
    assert busy.status == "timeout" and busy.duration < 10


def test_an_infinite_loop_inside_a_test_leaves_earlier_results_standing():
    solution = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n"
    outcome = sandbox.run_tests(solution, ADD_TESTS, timeout=2)
    assert outcome.outcomes == {"test_small": "passed", "test_negative": "error", "test_zero": "error"}
    assert outcome.result.status == "timeout"


def test_output_floods_are_capped():
    endless = run("while True:\n    print('x' * 1000)", timeout=20)
    big = run("print('y' * 100_000)", max_output=1000)
    assert endless.status == "output_limit" and len(endless.stdout) < 30_000
    assert big.status == "ok" and big.stdout.endswith(sandbox.TRUNCATION_MARKER) and len(big.stdout) < 1100
    garbage = run("import sys\nsys.stdout.buffer.write(bytes(range(256)) * 10)")
    assert garbage.status == "ok"


# ------------------------------------------------------------------------------------- no bubblewrap, no run


def test_without_bwrap_the_sandbox_refuses_with_what_to_install(monkeypatch, tmp_path):
    sandbox.require_bwrap.cache_clear()
    try:
        monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
        with pytest.raises(ConfigError, match="apt-get install bubblewrap"):
            sandbox.run_python("print('never runs')")
        sandbox.require_bwrap.cache_clear()
        broken = tmp_path / "bwrap"
        broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        broken.chmod(0o755)
        monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(broken))
        with pytest.raises(ConfigError, match="cannot create the sandbox here .*No permissions"):
            sandbox.run_tests(CORRECT_ADD, ADD_TESTS)
    finally:
        sandbox.require_bwrap.cache_clear()


def test_the_agentic_package_is_not_imported_by_the_evaluator_until_asked_for():
    code = "import sys, emotune.evaluate.run, emotune.cli; print(any('agentic' in m for m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr
