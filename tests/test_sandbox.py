"""Hostile programs against emotune.evaluate.sandbox: each must be contained and the evaluation must go on."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from emotune.evaluate import sandbox

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


def run(code: str, **kwargs) -> sandbox.SandboxResult:
    return sandbox.run_python(textwrap.dedent(code), **kwargs)


def processes_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


# ---------------------------------------------------------------------------------------------- the basics


def test_correct_code_runs_and_its_stdout_is_captured():
    result = run("print('hello from the sandbox')")
    assert result.status == "ok"
    assert result.returncode == 0
    assert result.stdout == "hello from the sandbox\n"
    assert result.blocked == []


def test_a_crashing_program_reports_error_with_its_traceback():
    result = run("raise ValueError('boom')")
    assert result.status == "error"
    assert result.returncode == 1
    assert "ValueError: boom" in result.stderr


def test_sys_exit_code_of_a_program_is_its_returncode():
    result = run("import sys; sys.exit(3)")
    assert (result.status, result.returncode) == ("error", 3)


def test_helper_files_are_written_beside_main_and_importable():
    result = sandbox.run_python(
        "from helpers.util import twice\nprint(twice(21), open('data.txt').read())",
        files={"helpers/__init__.py": "", "helpers/util.py": "def twice(x):\n    return 2 * x\n", "data.txt": "ok"},
    )
    assert result.status == "ok", result.stderr
    assert result.stdout == "42 ok\n"


def test_files_with_paths_outside_the_folder_are_refused_by_the_caller_side():
    for bad in ("../escape.py", "/tmp/escape.py", "a/../../escape.py"):
        with pytest.raises(ValueError):
            sandbox.run_python("pass", files={bad: "x"})


def test_ordinary_work_inside_the_folder_still_works():
    result = run(
        """
        import asyncio, json, os, tempfile, threading, shutil, sqlite3
        from pathlib import Path
        Path("notes").mkdir()
        Path("notes/a.txt").write_text("hi")
        os.rename("notes/a.txt", "notes/b.txt")
        with tempfile.TemporaryDirectory() as scratch:
            Path(scratch, "x").write_text("y")
        shutil.rmtree("notes")
        db = sqlite3.connect(":memory:"); db.execute("create table t (x)"); db.close()
        async def answer():
            return 42
        t = threading.Thread(target=lambda: None); t.start(); t.join()
        print(json.dumps({"answer": asyncio.run(answer()), "files": sorted(os.listdir("."))}))
        """
    )
    assert result.status == "ok", result.stderr
    assert result.stdout.strip() == '{"answer": 42, "files": ["main.py"]}'


def test_numpy_still_imports_although_ctypes_is_refused():
    pytest.importorskip("numpy")
    result = run("import numpy as np; print(int(np.arange(5).sum()))")
    assert result.status == "ok", result.stderr
    assert result.stdout == "10\n"
    assert result.blocked == []  # numpy's own optional `import ctypes` is refused silently


def test_a_correct_solution_passes_every_test():
    outcome = sandbox.run_tests(CORRECT_ADD, ADD_TESTS)
    assert (outcome.passed, outcome.failed, outcome.errors, outcome.total) == (3, 0, 0, 3)
    assert outcome.all_passed
    assert not outcome.tests_modified
    assert outcome.result.status == "ok"


def test_a_wrong_solution_fails_some_tests():
    outcome = sandbox.run_tests("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert outcome.passed == 1  # 0 - 0 == 0
    assert outcome.failed == 2
    assert not outcome.all_passed
    assert outcome.outcomes == {"test_small": "failed", "test_negative": "failed", "test_zero": "passed"}
    assert "AssertionError" in outcome.result.stderr


def test_a_solution_that_does_not_import_makes_every_test_an_error():
    outcome = sandbox.run_tests("def add(a, b) return a + b\n", ADD_TESTS)
    assert (outcome.passed, outcome.errors, outcome.total) == (0, 3, 3)
    assert "SyntaxError" in outcome.result.stderr


def test_the_total_comes_from_the_parent_not_the_child():
    assert sandbox._test_functions(ADD_TESTS) == (["test_small", "test_negative", "test_zero"], [])
    outcome = sandbox.run_tests(CORRECT_ADD, "")
    assert outcome.total == 0 and not outcome.all_passed


# ---------------------------------------------------------------------------------- 1. infinite loops


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    result = run("while True:\n    pass", timeout=1.5)
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert result.returncode is None
    assert 1.4 < elapsed < 4.0
    assert "timed out" in result.stderr


def test_a_program_that_ignores_sigterm_and_sleeps_is_still_killed():
    result = run(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(0.01)
        """,
        timeout=1.0,
    )
    assert result.status == "timeout" and result.returncode is None


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    start = time.monotonic()
    result = run("while True:\n    pass", timeout=20, cpu_seconds=1)
    assert result.status == "timeout"
    assert time.monotonic() - start < 6
    assert "SIGXCPU" in result.stderr or "SIGKILL" in result.stderr


def test_an_infinite_loop_inside_a_test_counts_as_error_and_earlier_tests_still_count():
    tests = ADD_TESTS + "\ndef test_hangs():\n    while True:\n        pass\n\ndef test_after():\n    assert True\n"
    outcome = sandbox.run_tests(CORRECT_ADD, tests, timeout=1.5)
    assert outcome.result.status == "timeout"
    assert outcome.passed == 3
    assert outcome.outcomes["test_hangs"] == "error" and outcome.outcomes["test_after"] == "error"
    assert not outcome.all_passed


# -------------------------------------------------------------------------------------- 2. fork bombs


def test_fork_bomb_with_os_fork_is_blocked():
    result = run("import os\nwhile True:\n    os.fork()", timeout=5)
    assert result.status == "blocked"
    assert "os.fork" in result.blocked
    assert "PermissionError" in result.stderr


def test_fork_bomb_with_subprocess_is_blocked():
    result = run(
        """
        import subprocess, sys
        while True:
            subprocess.Popen([sys.executable, "-c", "pass"])
        """,
        timeout=5,
    )
    assert result.status == "blocked"
    assert "subprocess.Popen" in result.blocked


@pytest.mark.parametrize(
    "attempt, event",
    [
        ("os.system('echo pwned')", "os.system"),
        ("os.posix_spawn(sys.executable, [sys.executable, '-c', 'pass'], {})", "os.posix_spawn"),
        ("os.execv(sys.executable, [sys.executable, '-c', 'print(1)'])", "os.exec"),
        ("os.popen('echo pwned').read()", "subprocess.Popen"),
        ("import _posixsubprocess; _posixsubprocess.fork_exec(*[None] * 23)", "_posixsubprocess.fork_exec"),
        ("import multiprocessing as m, time; m.Process(target=time.sleep, args=(9,)).start()", "os.fork"),
        ("import pty; pty.fork()", "os.forkpty"),
    ],
)
def test_every_way_of_starting_a_process_is_blocked(attempt, event):
    result = run(f"import os, sys\n{attempt}\nprint('escaped')", timeout=5)
    assert result.status == "blocked", result.stderr
    assert event in result.blocked
    assert "escaped" not in result.stdout and "pwned" not in result.stdout


# ------------------------------------------------------------------------------------- 3. memory bombs


def test_memory_bomb_is_contained():
    result = run("x = bytearray(8 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert result.status == "memory"
    assert "allocated" not in result.stdout


def test_a_slowly_growing_memory_bomb_is_contained():
    result = run("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 ** 2))", memory_mb=256, timeout=10)
    assert result.status in ("memory", "error", "killed")
    assert result.status != "ok"


def test_a_memory_bomb_in_a_test_fails_that_test_only():
    tests = ADD_TESTS + "\ndef test_greedy():\n    x = bytearray(8 * 1024 ** 3)\n"
    outcome = sandbox.run_tests(CORRECT_ADD, tests, memory_mb=256)
    assert outcome.passed == 3 and outcome.outcomes["test_greedy"] == "failed"
    assert outcome.result.status == "memory"


# -------------------------------------------------------------------------------------- 4. huge output


def test_huge_output_is_truncated_and_the_child_stopped():
    start = time.monotonic()
    result = run("import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()", max_output=5_000)
    assert time.monotonic() - start < 10
    assert result.status in ("output_limit", "ok")
    assert result.stdout.endswith(sandbox.TRUNCATION_MARKER)
    assert len(result.stdout) <= 5_000 + len(sandbox.TRUNCATION_MARKER) + 1


def test_endless_output_is_killed_with_output_limit():
    result = run("while True:\n    print('spam' * 100)", max_output=1_000, timeout=20)
    assert result.status == "output_limit"
    assert result.returncode is None
    assert result.stdout.endswith(sandbox.TRUNCATION_MARKER)


def test_output_over_max_output_is_truncated_with_a_marker():
    result = run("print('y' * 50_000)", max_output=1_000)
    assert result.status == "ok"
    assert result.stdout == "y" * 1_000 + "\n" + sandbox.TRUNCATION_MARKER


def test_binary_garbage_on_stdout_does_not_break_the_parent():
    result = run("import os\nos.write(1, bytes(range(256)) * 10)\nos.close(1)\nos.close(2)")
    assert result.status == "ok"
    assert "\ufffd" in result.stdout


# ---------------------------------------------------------------------------------- 5. environment secrets


def test_secrets_in_the_parent_environment_never_reach_the_child(monkeypatch):
    secrets = {
        "HF_TOKEN": "hf_secret_value_123",
        "WANDB_API_KEY": "wandb_secret_value_456",
        "MY_SECRET_KEY": "my_secret_value_789",
        "DB_PASSWORD": "password_value_000",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    result = run(
        """
        import os
        print(dict(os.environ))
        for path in ("/proc/self/environ", f"/proc/{os.getppid()}/environ", "/proc/1/environ"):
            try:
                print(open(path, "rb").read())
            except PermissionError:
                print("blocked", path)
        """
    )
    seen = result.stdout + result.stderr
    for value in secrets.values():
        assert value not in seen
    env = eval(result.stdout.splitlines()[0])  # noqa: S307 - our own child's repr of a dict of str
    assert set(env) <= {"PATH", "LANG", "HOME", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "TMPDIR", "LC_CTYPE"}
    assert env["HOME"] != os.environ["HOME"]
    assert result.stdout.count("blocked /proc/") == 3


def test_the_nonce_is_not_visible_to_the_child(monkeypatch):
    nonce = "f00dfeed" * 4
    monkeypatch.setattr(sandbox.secrets, "token_hex", lambda n: nonce)
    result = run("import os, sys\nprint(sys.argv, sys.orig_argv, dict(os.environ), sys.stdin.read())")
    assert result.status == "ok", result.stderr
    assert nonce not in result.stdout


# ------------------------------------------------------------------------------ 6. credentials on disk


def test_reading_the_huggingface_token_is_blocked(tmp_path, monkeypatch):
    home = tmp_path / "home"
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_fake_token_value")
    monkeypatch.setenv("HOME", str(home))
    real_token = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".cache", "huggingface", "token")
    result = run(
        f"""
        import os
        for path in ({str(token)!r}, {real_token!r}, os.path.expanduser("~/.cache/huggingface/token")):
            try:
                print(open(path).read())
            except PermissionError:
                print("blocked")
            except FileNotFoundError:
                print("missing")
        """
    )
    assert "hf_fake_token_value" not in result.stdout + result.stderr
    assert result.stdout.split() == ["blocked", "blocked", "missing"]  # the child's own HOME is its folder
    assert f"open:{token}" in result.blocked
    assert any(entry.endswith("/.cache/huggingface/token") and str(tmp_path) not in entry for entry in result.blocked)
    assert result.status == "blocked"


@pytest.mark.parametrize(
    "attempt",
    [
        "open('/etc/passwd').read()",
        "open('/etc/passwd', 'rb', buffering=0).read()",
        "os.read(os.open('/etc/passwd', os.O_RDONLY), 100)",
        "__import__('pathlib').Path('/etc/passwd').read_text()",
        "(os.symlink('/etc/passwd', 'p'), open('p').read())",
        "os.listdir('/root')",
        "list(os.scandir('/etc'))",
        "__import__('glob').glob('/root/.cache/*')",
        "__import__('sqlite3').connect('/tmp/emotune-escape.db')",
    ],
)
def test_reading_outside_the_folder_is_blocked(attempt):
    result = run(f"import os\nprint({attempt})")
    assert result.status == "blocked", result.stderr
    assert "root:" not in result.stdout
    assert result.blocked


# ------------------------------------------------------------------------------- 7. writing outside


def test_writing_outside_the_folder_is_blocked_and_leaves_no_file():
    target = f"/tmp/emotune-escape-{uuid.uuid4().hex}"
    result = run(
        f"""
        import os, pathlib, shutil
        target = {target!r}
        attempts = [
            lambda: open(target, "w").write("escaped"),
            lambda: os.open(target, os.O_WRONLY | os.O_CREAT),
            lambda: pathlib.Path(target).write_text("escaped"),
            lambda: open(os.path.relpath(target), "a").write("escaped"),
            lambda: (os.symlink(target, "link"), open("link", "w").write("escaped")),
            lambda: shutil.copy("main.py", target),
            lambda: os.mkdir(target),
        ]
        for attempt in attempts:
            try:
                attempt()
                print("ESCAPED")
            except PermissionError:
                print("blocked")
        """
    )
    assert not os.path.lexists(target)
    assert "ESCAPED" not in result.stdout
    assert result.stdout.split() == ["blocked"] * 7
    assert f"open:{target}" in result.blocked
    assert result.status == "blocked"


def test_a_directory_descriptor_cannot_be_used_to_write_into_site_packages():
    purelib = sysconfig.get_paths()["purelib"]
    name = f"emotune-escape-{uuid.uuid4().hex}.pth"
    result = run(
        f"""
        import os
        fd = os.open({purelib!r}, os.O_RDONLY | os.O_DIRECTORY)
        os.close(os.open({name!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        print("ESCAPED")
        """
    )
    assert not os.path.exists(os.path.join(purelib, name))
    assert result.status == "blocked" and "ESCAPED" not in result.stdout


def test_device_nodes_cannot_be_made_or_opened():
    result = run("import os, stat\nos.mknod('disk', stat.S_IFBLK | 0o600, os.makedev(8, 0))\nprint('ESCAPED')")
    assert result.status == "blocked" and "os.mknod" in result.blocked


# ------------------------------------------------------------------------------ 8. deleting outside


def test_deleting_outside_the_folder_is_blocked(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim_dir = tmp_path / "victim-dir"
    (victim_dir / "inner").mkdir(parents=True)
    result = run(
        f"""
        import os, shutil
        attempts = [
            lambda: os.remove({str(victim)!r}),
            lambda: os.unlink({str(victim)!r}),
            lambda: shutil.rmtree({str(victim_dir)!r}),
            lambda: os.rmdir({str(victim_dir / "inner")!r}),
            lambda: os.rename({str(victim)!r}, "stolen.txt"),
            lambda: os.truncate({str(victim)!r}, 0),
            lambda: os.chmod({str(victim)!r}, 0),
        ]
        for attempt in attempts:
            try:
                attempt()
                print("ESCAPED")
            except PermissionError:
                print("blocked")
        """
    )
    assert result.stdout.split() == ["blocked"] * 7
    assert victim.read_text() == "precious"
    assert (victim_dir / "inner").is_dir()
    assert f"os.remove:{victim}" in result.blocked


# -------------------------------------------------------------------------------------- 9. network


def test_network_connections_are_blocked():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        result = run(
            f"""
            import socket
            attempts = [
                lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1),
                lambda: socket.socket().connect(("127.0.0.1", {port})),
                lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port})),
                lambda: socket.getaddrinfo("localhost", 80),
                lambda: socket.socket().bind(("127.0.0.1", 0)),
                lambda: __import__("urllib.request").request.urlopen("http://127.0.0.1:{port}/", timeout=1),
            ]
            for attempt in attempts:
                try:
                    attempt()
                    print("CONNECTED")
                except PermissionError:
                    print("blocked")
                except OSError as exc:
                    print("blocked" if "sandbox" in str(exc) else repr(exc))
            """
        )
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert result.stdout.split() == ["blocked"] * 6
    assert "socket.connect" in result.blocked
    assert result.status == "blocked"


# ------------------------------------------------------------------------- 10. processes that outlive


def test_a_child_cannot_outlive_the_sandbox():
    marker = f"emotune-orphan-{uuid.uuid4().hex}"
    result = run(
        f"""
        import os, subprocess, sys, time
        cmd = [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}]
        def double_fork():
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv(sys.executable, cmd)
                os._exit(0)
        def posix_spawn_setsid():
            os.posix_spawn(sys.executable, cmd, {{}}, setsid=True)
        def popen_new_session():
            subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def raw_fork_exec():
            import _posixsubprocess
            _posixsubprocess.fork_exec(*[None] * 23)
        def fresh_posixsubprocess():
            import importlib.util, sys
            del sys.modules["_posixsubprocess"]
            importlib.import_module("_posixsubprocess")
        for attempt in (double_fork, posix_spawn_setsid, popen_new_session, raw_fork_exec, fresh_posixsubprocess):
            try:
                attempt()
                print("spawned")
            except PermissionError:
                print("blocked")
        """,
        timeout=5,
    )
    time.sleep(0.2)
    assert processes_with(marker) == []
    assert result.stdout.split() == ["blocked"] * 5, result.stderr
    assert {"os.fork", "os.posix_spawn", "subprocess.Popen", "_posixsubprocess.fork_exec"} <= set(result.blocked)


def test_stray_processes_in_the_folder_are_killed_by_the_sweep(tmp_path):
    # Defence in depth for a child the audit hook missed (e.g. spawned by native code): it is found by cwd.
    marker = f"emotune-stray-{uuid.uuid4().hex}"
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker], cwd=tmp_path, start_new_session=True
    )
    try:
        killed = sandbox._kill_strays(str(tmp_path))
        assert stray.pid in killed
        assert stray.wait(timeout=5) == -9
    finally:
        if stray.poll() is None:
            stray.kill()


@pytest.mark.parametrize(
    "attempt, event",
    [
        ("os.kill(os.getppid(), 0)", "os.kill:"),
        ("os.killpg(os.getpgid(os.getppid()), 0)", "os.killpg:"),
        ("import signal; signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 0)", "os.pidfd_open"),
        (
            "import _imp, importlib.util; _imp.create_builtin(importlib.util.find_spec('posix')).pidfd_open(1)",
            "import:posix",
        ),
    ],
)
def test_signalling_other_processes_is_blocked(attempt, event):
    result = run(f"import os\n{attempt}\nprint('ESCAPED')")
    assert result.status == "blocked", result.stderr
    assert any(entry.startswith(event) for entry in result.blocked)


# ------------------------------------------------------------------------ 11. cd / and write there


def test_changing_the_working_directory_to_root_and_writing_is_blocked():
    name = f"emotune-escape-{uuid.uuid4().hex}.txt"
    result = run(
        f"""
        import os
        for attempt in (lambda: os.chdir("/"), lambda: os.chdir(".."), lambda: os.fchdir(os.open("/", os.O_RDONLY))):
            try:
                attempt()
                print("MOVED")
            except PermissionError:
                print("blocked")
        open({name!r}, "w").write("stays inside")  # cwd is still the sandbox folder
        print(os.getcwd() == os.environ["HOME"])
        try:
            open("/" + {name!r}, "w")
        except PermissionError:
            print("blocked")
        """
    )
    assert result.stdout.split() == ["blocked", "blocked", "blocked", "True", "blocked"], result.stderr
    assert not os.path.exists("/" + name)
    assert "os.chdir:/" in result.blocked


# -------------------------------------------------------------------------- 12-15. reward hacking


def test_sys_exit_inside_a_test_counts_as_failed_not_passed():
    solution = "import sys\n\ndef add(a, b):\n    if (a, b) == (1, 2):\n        sys.exit(0)\n    return a + b\n"
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.outcomes["test_small"] == "failed"
    assert (outcome.passed, outcome.failed) == (2, 1)
    assert not outcome.all_passed


def test_sys_exit_at_import_time_passes_no_tests():
    outcome = sandbox.run_tests("import sys\nsys.exit(0)\n", ADD_TESTS)
    assert (outcome.passed, outcome.errors) == (0, 3)


def test_rewriting_test_solution_py_is_detected_as_tampering():
    solution = textwrap.dedent(
        """
        try:
            with open("test_solution.py", "w") as fh:
                fh.write("def test_x():\\n    pass\\n")
        except PermissionError:
            pass
        def add(a, b):
            return a + b
        """
    )
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.tests_modified
    assert not outcome.all_passed
    assert any("test_solution.py" in reason for reason in outcome.tampering)
    assert outcome.total == 3  # the original tests still ran
    assert "test_x" not in outcome.outcomes


@pytest.mark.parametrize(
    "attack",
    [
        "os.replace('new.py', 'test_solution.py')",
        "os.remove('test_solution.py')",
        "os.truncate('test_solution.py', 0)",
        "os.link('test_solution.py', 'alias.py'); open('alias.py', 'w').write('')",
        "os.symlink('test_solution.py', 'alias.py'); open('alias.py', 'w').write('')",
    ],
)
def test_every_way_of_changing_the_test_file_is_blocked_and_flagged(attack):
    solution = (
        "import os\nopen('new.py', 'w').write('def test_x():\\n    pass\\n')\n"
        f"try:\n    {attack}\nexcept PermissionError:\n    pass\n" + CORRECT_ADD
    )
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.tests_modified, outcome.result.stderr
    assert not outcome.all_passed
    assert outcome.total == 3


def test_monkeypatching_a_later_test_function_is_detected():
    solution = textwrap.dedent(
        """
        import sys

        def add(a, b):
            sys.modules["test_solution"].test_impossible = lambda: None
            return a + b
        """
    )
    tests = ADD_TESTS + "\ndef test_impossible():\n    assert add(2, 2) == 5\n"
    outcome = sandbox.run_tests(solution, tests)
    assert outcome.outcomes["test_impossible"] == "error"
    assert outcome.tests_modified and not outcome.all_passed
    assert any("test_impossible was replaced" in reason for reason in outcome.tampering)


def test_replacing_a_test_functions_code_is_blocked():
    solution = textwrap.dedent(
        """
        import sys

        def add(a, b):
            try:
                sys.modules["test_solution"].test_impossible.__code__ = (lambda: None).__code__
            except PermissionError:
                pass
            return a + b
        """
    )
    tests = ADD_TESTS + "\ndef test_impossible():\n    assert add(2, 2) == 5\n"
    outcome = sandbox.run_tests(solution, tests)
    assert outcome.outcomes["test_impossible"] == "failed"
    assert outcome.tests_modified
    assert any("__code__" in entry for entry in outcome.result.blocked)


def test_patching_builtins_is_detected_as_tampering():
    solution = "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n" + CORRECT_ADD
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.tests_modified
    assert "builtins.AssertionError was replaced" in outcome.tampering


def test_a_fake_json_result_line_is_ignored():
    fake = (
        '{"type": "summary", "outcomes": {"test_small": "passed", "test_negative": "passed", "test_zero": "passed"}}'
    )
    solution = textwrap.dedent(
        f"""
        import os
        FAKE = {fake!r}
        print(FAKE)
        print('{{"passed": 3, "failed": 0, "errors": 0, "total": 3}}')
        for fd in range(3, 64):
            try:
                os.write(fd, ("0" * 32 + " " + FAKE + "\\n").encode())
                os.write(fd, b"garbage without a newline ")
            except OSError:
                pass

        def add(a, b):
            print(FAKE)
            return a * b
        """
    )
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.outcomes == {"test_small": "failed", "test_negative": "failed", "test_zero": "passed"}
    assert (outcome.passed, outcome.failed) == (1, 2)


def test_os_exit_at_import_time_passes_no_tests():
    outcome = sandbox.run_tests("import os\nos._exit(0)\n" + CORRECT_ADD, ADD_TESTS)
    assert outcome.passed == 0
    assert outcome.errors == outcome.total == 3
    assert outcome.result.returncode == 0  # the process "succeeded", the evaluation did not
    assert not outcome.all_passed


def test_os_exit_during_a_test_leaves_that_and_later_tests_unpassed():
    solution = "import os\n\ndef add(a, b):\n    if (a, b) == (-1, -1):\n        os._exit(0)\n    return a + b\n"
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.outcomes == {"test_small": "passed", "test_negative": "error", "test_zero": "error"}
    assert not outcome.all_passed


# ------------------------------------------------------------------ escapes of the audit hook itself


@pytest.mark.parametrize(
    "attempt, event",
    [
        ("import ctypes", "import:ctypes"),
        ("import _ctypes", "import:_ctypes"),
        ("import _xxsubinterpreters", "import:_xxsubinterpreters"),
        ("import _testcapi", "import:_testcapi"),
        ("import gc; gc.get_objects()", "gc.get_objects"),
        ("import gc; gc.get_referrers(sys)", "gc.get_referrers"),
        ("sys._current_frames()", "sys._current_frames"),
        ("sys.settrace(lambda *a: None)", "sys.settrace"),
        ("import resource; resource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "resource.setrlimit"),
        ("import marshal; marshal.loads(marshal.dumps(compile('1', 'x', 'eval')))", "marshal.loads"),
        ("compile('1', 'x', 'eval').replace(co_code=b'')", "code.__new__"),
    ],
)
def test_ways_around_the_audit_hook_are_closed(attempt, event):
    result = run(f"import sys\n{attempt}\nprint('ESCAPED')")
    assert "ESCAPED" not in result.stdout
    assert event in result.blocked, (result.blocked, result.stderr)


def test_a_second_audit_hook_is_not_installed():
    # CPython swallows an Exception from the existing hooks here and simply does not add the new one
    result = run("import sys\nsys.addaudithook(lambda event, args: print('HOOKED', event))\nopen('x', 'w').close()")
    assert "HOOKED" not in result.stdout
    assert "sys.addaudithook" in result.blocked


def test_a_native_extension_written_into_the_folder_is_not_loaded():
    result = run(
        """
        import importlib.machinery
        open("evil" + importlib.machinery.EXTENSION_SUFFIXES[0], "wb").write(b"\\x7fELF not really")
        import evil
        """
    )
    assert result.status == "blocked"
    assert any(entry.startswith("import:evil from ") for entry in result.blocked)


def test_bytecode_planted_in_the_folder_is_not_loaded():
    result = run(
        """
        open("planted.pyc", "wb").write(b"\\x00" * 64)
        import planted
        """
    )
    assert result.status == "blocked"
    assert any(entry.endswith("/planted.pyc") for entry in result.blocked)


# ------------------------------------------------------- reaching the runner through interpreter frames

IMPOSSIBLE_TESTS = textwrap.dedent(
    """
    from solution import add

    def test_a():
        assert add(2, 2) == 5

    def test_b():
        assert add(1, 1) == 3
    """
)


@pytest.mark.parametrize(
    "grab",
    [
        "f = sys._getframe(1)",
        "import inspect; f = inspect.currentframe()",
        "import inspect; f = inspect.stack()[1].frame",
        "import logging; f = logging.currentframe()",
        "import traceback; f = next(traceback.walk_stack(None))[0]",
        "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n    f = exc.__traceback__.tb_frame",
        "def gen():\n    yield\nf = gen().gi_frame",
    ],
)
def test_walking_interpreter_frames_to_forge_results_is_blocked(grab):
    # The attack that works against a naive in-process runner: walk up to its frame and call its reporting code.
    solution = (
        "import os, sys\n\ndef add(a, b):\n"
        + textwrap.indent(grab, "    ")
        + textwrap.indent(
            textwrap.dedent(
                """
                while f is not None:
                    for value in list(f.f_locals.values()):
                        if callable(value) and getattr(value, "__name__", "") in ("report", "emit", "hook", "finish"):
                            print("FOUND", value.__name__)
                    f = f.f_back
                sys.audit("sandbox.report", "test_a", "passed")
                sys.audit("sandbox.report", "test_b", "passed")
                sys.audit("sandbox.finish")
                os._exit(0)
                """
            ),
            "    ",
        )
    )
    outcome = sandbox.run_tests(solution, IMPOSSIBLE_TESTS)
    assert outcome.passed == 0
    assert not outcome.all_passed
    assert "FOUND" not in outcome.result.stdout
    assert any(entry.startswith("frame introspection") for entry in outcome.result.blocked), outcome.result.stderr


def test_forged_runner_events_are_refused_and_flagged():
    solution = textwrap.dedent(
        """
        import os, sys
        for name in ("test_a", "test_b"):
            try:
                sys.audit("sandbox.report", name, "passed")
            except PermissionError:
                pass
        try:
            sys.audit("sandbox.finish")
        except PermissionError:
            pass

        def add(a, b):
            return a + b
        """
    )
    outcome = sandbox.run_tests(solution, IMPOSSIBLE_TESTS)
    assert outcome.passed == 0 and outcome.failed == 2
    assert outcome.tests_modified
    assert "forged sandbox.report event" in outcome.tampering


def test_signal_handlers_in_a_test_run_receive_no_frame():
    solution = textwrap.dedent(
        """
        import os, signal
        frames = []
        signal.signal(signal.SIGUSR1, lambda signum, frame: frames.append(frame))

        def add(a, b):
            os.kill(os.getpid(), signal.SIGUSR1)
            print("frames:", frames)
            return a + b
        """
    )
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.all_passed
    assert "frames: [None]" in outcome.result.stdout


def test_stdlib_helpers_that_use_frames_internally_still_work_in_a_test_run():
    solution = textwrap.dedent(
        """
        import collections, dataclasses, enum, logging, traceback, typing, warnings

        Point = collections.namedtuple("Point", "x y")
        Colour = enum.Enum("Colour", "RED GREEN")
        T = typing.TypeVar("T")

        class Pair(typing.NamedTuple):
            a: int

        @dataclasses.dataclass
        class Box:
            v: int = 0

        logging.basicConfig(level=logging.INFO)
        log = logging.getLogger("solution")

        def add(a, b):
            log.info("adding %s and %s", a, b)
            try:
                1 / 0
            except ZeroDivisionError:
                log.exception("handled")
                traceback.format_exc()
            traceback.format_stack()
            warnings.warn("just a warning")
            return Point(a, b).x + Pair(b).a + Box().v
        """
    )
    outcome = sandbox.run_tests(solution, ADD_TESTS)
    assert outcome.all_passed, outcome.result.stderr
    assert outcome.result.blocked == []


@pytest.mark.parametrize(
    "module, event",
    [("_xxsubinterpreters", "import:_xxsubinterpreters"), ("xxsubtype", "import:xxsubtype"), ("_ctypes", None)],
)
def test_importlib_import_module_does_not_sidestep_the_import_policy(module, event):
    result = run(f"import importlib\nimportlib.import_module({module!r})\nprint('ESCAPED')")
    assert "ESCAPED" not in result.stdout
    if event is not None:
        assert event in result.blocked


def test_a_fresh_posix_module_cannot_be_created_to_reach_unguarded_functions():
    result = run(
        """
        import _imp, importlib.util, os
        for cell in _imp.create_builtin.__closure__:  # the guard holds nothing that could do it either
            assert getattr(cell.cell_contents, "__name__", "") != "create_builtin"
        fresh = _imp.create_builtin(importlib.util.find_spec("posix"))
        print("ESCAPED", fresh.pidfd_open(os.getppid()))
        """
    )
    assert "ESCAPED" not in result.stdout
    assert "import:posix" in result.blocked
