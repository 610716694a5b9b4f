"""The program the sandboxed child Python runs (``python -I -S -B -c <this source>``). Standard library only.

It is never imported by emotune: :mod:`emotune.evaluate.agentic.sandbox` reads this file as text and runs it
inside bubblewrap. Isolation comes from the OS; this program only does what the OS cannot:

1. read its configuration (nonce, limits, test source) from stdin, then close stdin, so the nonce is in no
   file the user code can reopen;
2. set the rlimits in the child itself (not through ``preexec_fn``, which can deadlock a threaded parent),
   and drop root to the unprivileged uid/gid the parent chose (root is exempt from ``RLIMIT_NPROC``);
3. run ``main.py`` (script mode) or every ``test_*`` function of the test source the parent handed over
   (tests mode), and report each outcome as a ``<nonce> <json>`` line on the inherited report descriptor.

A printed fake report has no nonce and is ignored. The nonce lives in this process's memory, so code that
searches the interpreter's memory for it can forge reports; the parent's test-file digest and the per-test
function identity check below are the other two reward-hack detectors.
"""

import json
import os
import resource
import sys
import traceback
import types
from typing import Any


def _main() -> None:
    cfg = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    os.close(0)
    for name, (soft, hard) in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["drop_to"] is not None:
        uid, gid = cfg["drop_to"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    nonce_prefix = (cfg.pop("nonce") + " ").encode()
    fd = cfg["report_fd"]
    os.set_inheritable(fd, False)  # a subprocess the user starts gets no report channel

    def report(**payload: object) -> None:
        try:
            os.write(fd, nonce_prefix + json.dumps(payload).encode() + b"\n")
        except OSError:
            pass

    def print_error(exc: BaseException) -> None:
        tb = exc.__traceback__
        traceback.print_exception(type(exc), exc, tb.tb_next if tb is not None else None)

    sys.path.insert(0, "/task")
    if cfg["mode"] == "script":
        module = types.ModuleType("__main__")
        module.__file__ = "/task/main.py"
        sys.modules["__main__"] = module
        sys.argv[:] = ["/task/main.py"]
        try:
            exec(compile(cfg["source"], "/task/main.py", "exec"), module.__dict__)
        except SystemExit:
            raise
        except BaseException as exc:
            if isinstance(exc, MemoryError):
                report(type="memory")
            print_error(exc)
            raise SystemExit(1) from None
        return

    names = cfg["names"]
    code = compile(cfg["source"], "/task/test_solution.py", "exec")  # the parent's copy, not the file on disk
    module = types.ModuleType("test_solution")
    module.__file__ = "/task/test_solution.py"
    sys.modules["test_solution"] = module
    try:
        exec(code, module.__dict__)
    except BaseException as exc:  # the solution did not import: no test can run
        print_error(exc)
        for name in names:
            report(type="test", name=name, outcome="error")
        os._exit(1)
    defined: dict[str, Any] = {name: module.__dict__.get(name) for name in names}
    compiled = {c.co_name: c for c in code.co_consts if isinstance(c, types.CodeType)}
    plain = set(names) - set(cfg["decorated"])  # a decorated test's code is its decorator's wrapper
    failed = False
    for name in names:
        fn: Any = module.__dict__.get(name)
        if not isinstance(fn, types.FunctionType) or fn is not defined[name]:
            problem = "was replaced or is not a function"
        elif name in plain and (fn.__code__ is not compiled.get(name) or fn.__globals__ is not module.__dict__):
            problem = "was patched"
        else:
            problem = ""
        if problem:
            report(type="tamper", reason=f"test_solution.{name} {problem}")
            report(type="test", name=name, outcome="error")
            failed = True
            continue
        try:
            returned = fn()
            # a generator or coroutine test never ran its asserts
            outcome = "failed" if isinstance(returned, (types.GeneratorType, types.CoroutineType)) else "passed"
        except BaseException as exc:  # SystemExit and KeyboardInterrupt included: a test that exits failed
            outcome = "failed"
            if isinstance(exc, MemoryError):
                report(type="memory")
            sys.stderr.write(f"FAILED {name}\n")
            print_error(exc)
        report(type="test", name=name, outcome=outcome)
        failed = failed or outcome != "passed"
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


_main()
