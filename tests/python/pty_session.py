"""Drives `nembo ssh CLUSTER [--node N]` in a real pseudo-terminal, as a
person at a keyboard would, and prints what happened as JSON:

    python3 pty_session.py NEMBO_BIN CLUSTER NODE_RANK

Steps: read $SKYPILOT_NODE_RANK, resize the terminal (the kernel sends the
CLI SIGWINCH; the remote `stty size` must follow), Ctrl-C a `sleep`, then
`exit 7` (the CLI must exit 7).
"""

import fcntl
import json
import os
import pty
import select
import struct
import sys
import termios
import time

nembo, cluster, rank = sys.argv[1], sys.argv[2], sys.argv[3]
pid, fd = pty.fork()
if pid == 0:
    os.execv(nembo, [nembo, "ssh", cluster, "--node", rank])

seen = b""


def read_until(needle, timeout=15.0):
    global seen
    end = time.time() + timeout
    while time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if needle.encode() in seen:
                return True
    return False


def send(text):
    os.write(fd, text.encode())


out = {}
send("echo RANK=$SKYPILOT_NODE_RANK.\n")
out["rank"] = read_until("RANK=%s." % rank)

fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 41, 101, 0, 0))
time.sleep(0.5)
send("echo SIZE=$(stty size).\n")
out["resized"] = read_until("SIZE=41 101.")

send("sleep 30; echo SLEPT-$((1))\n")
time.sleep(1.0)
t0 = time.time()
send("\x03")
send("echo INTER$((1))RUPTED\n")
# Typed text is echoed back: look for what only the commands print.
out["ctrl_c"] = read_until("INTER1RUPTED", timeout=10) and b"SLEPT-1" not in seen
out["ctrl_c_seconds"] = round(time.time() - t0, 2)

send("exit 7\n")
deadline = time.time() + 15
status = None
while time.time() < deadline:
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = os.waitstatus_to_exitcode(st)
        break
    try:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            seen += os.read(fd, 4096)
    except OSError:
        pass
out["exit_code"] = status
out["transcript"] = seen.decode(errors="replace")[-2000:]
print(json.dumps(out))
