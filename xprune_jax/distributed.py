"""Multi-process runs: joining them, watching them, and ending each command together.

``xprune predict|eval|score|finetune`` run as one process per host (or per accelerator) when given
``--coordinator_address``, ``--num_processes`` and ``--process_id``, or when JAX detects a cluster that
supplies them (Cloud TPU, Slurm, Open MPI). :func:`session` wraps one command:

- **Start.** ``jax.distributed.initialize`` (gloo collectives on CPU), bounded by ``timeout`` seconds:
  a process that cannot reach the coordinator, or a coordinator whose peers do not all come, stops with
  one line instead of JAX's abort. A loopback coordinator binds to loopback only.
- **Watchdog.** A thread in every process bumps a heartbeat key in the coordinator's key-value store
  each second and reads the others'. A process silent for ``timeout`` seconds (crashed, killed, hung)
  stops every other one with a line naming it (JAX's own heartbeat timeout is set longer, so this
  fires first). A process that fails (bad input, a bug) posts its message, and the others stop at once
  quoting it. Only a dead coordinator (process 0) is reported by JAX itself: the other processes abort
  at once with JAX's "Terminating process because the JAX distributed service detected fatal errors".
- **Logs.** Process 0 prints to the terminal as usual; every other process writes its output to
  ``<out>.process<N>.log``. Errors still reach each process's terminal (stderr) as one line.
- **End.** Process 0 alone writes results. The others wait for it to finish them (watched) before
  exiting, so JAX's shutdown barrier never times out while process 0 runs pycocotools or saves a model.
"""

import atexit
import contextlib
import dataclasses
import ipaddress
import os
import socket
import sys
import threading
import time
import traceback

import jax

from xprune_jax.errors import UserError

POLL_SECONDS = 1.0
FLAGS_TEXT = "--coordinator_address, --num_processes and --process_id"


@dataclasses.dataclass
class Session:
    coordinator: str
    processes: int
    index: int
    timeout: float
    command: str = ""
    commands: int = 0  # commands run in this session (each ends with its own "done" key)
    terminal: object = None  # this process's stderr as it was before the log took it over
    log: str | None = None  # where this process's output goes (None: the terminal; process 0)
    closing: threading.Event = dataclasses.field(default_factory=threading.Event)  # the watchdog stops


_session: Session | None = None
_stopping = threading.Lock()


def active() -> bool:
    return _session is not None and _session.processes > 1


def check_arguments(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                    timeout: float) -> None:
    """One-line errors for multi-process flags that cannot work, before anything starts."""
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num_processes={num_processes} is invalid: use the number of processes of the run (>= 1)")
    if process_id is not None:
        top = (num_processes - 1) if num_processes else None
        if process_id < 0 or (top is not None and process_id > top):
            choices = f"0..{top}" if top is not None else "an index >= 0"
            raise UserError(f"--process_id={process_id} is invalid: use {choices}, a different one for each process "
                            "(0 runs the coordinator and writes the results)")
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--coordinator_address={coordinator_address} is invalid: give HOST:PORT of process 0, "
                            "e.g. 10.0.0.1:1234 (127.0.0.1:PORT on one host)")
    if not timeout > 0:
        raise UserError(f"--distributed_timeout={timeout:g} is invalid: use a positive number of seconds, e.g. 120")


DETECTED_CLUSTERS = ("gcetpu", "gketpu", "slurm", "ompi")  # JAX's names: Cloud TPU (GCE, GKE), Slurm, Open MPI


def _detected_cluster() -> str | None:
    """JAX's name of the cluster found here, if Cloud TPU, Slurm or Open MPI (others, such as plain Kubernetes,
    need the flags)."""
    try:
        from jax._src import clusters

        return next((env.name for env in clusters.ClusterEnv._cluster_types
                     if env.name in DETECTED_CLUSTERS and env.is_env_present()), None)
    except Exception:  # a JAX without this internal API: detection is left to explicit flags
        return None


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except OSError:
        return False


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def _join(coordinator_address, num_processes, process_id, timeout: float, cluster: str | None,
          command: str) -> Session:
    """``jax.distributed.initialize`` with our bounds and errors; the session it starts."""
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise UserError(f"{FLAGS_TEXT} must come before any JAX work in this process; start a new process")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    state = jax_distributed.global_state

    def join_failed():
        address, index = state.coordinator_address or coordinator_address, state.process_id
        if index != 0 and not _reachable(address):
            message = (f"cannot reach the coordinator at {address} within {timeout:g} s: start process 0 there "
                       "(--process_id=0) or correct --coordinator_address")
        else:
            message = (f"not every process joined the coordinator at {address} within {timeout:g} s: start all "
                       f"{num_processes or 'the'} processes with the same --coordinator_address and --num_processes, "
                       "each with its own --process_id, or raise --distributed_timeout")
        _exit_with(message, post=False, command=command)

    timer = threading.Timer(timeout, join_failed)
    timer.daemon = True
    timer.start()
    try:
        bind = coordinator_address if coordinator_address and _loopback(coordinator_address) else None
        jax.distributed.initialize(coordinator_address, num_processes, process_id, cluster_detection_method=cluster,
                                   initialization_timeout=int(timeout) + 60, coordinator_bind_address=bind,
                                   heartbeat_timeout_seconds=int(2 * timeout) + 10)
    except ValueError as e:  # nothing given or detected for some parameter
        raise UserError(f"cannot start a multi-process run ({str(e).rstrip('.')}): give {FLAGS_TEXT}") from None
    except Exception as e:  # process 0: "Failed to start RPC server" when the port is taken
        address, reason = state.coordinator_address or coordinator_address, str(e).splitlines()[0]
        if state.process_id == 0:
            raise UserError(f"cannot start the coordinator on {address} ({reason}): the port is in use or the address "
                            "is not this host's; choose another port in --coordinator_address") from None
        raise UserError(f"cannot join the coordinator at {address} ({reason}); check --coordinator_address") from None
    finally:
        timer.cancel()
    return Session(state.coordinator_address, jax.process_count(), jax.process_index(), timeout)


@contextlib.contextmanager
def session(coordinator_address, num_processes, process_id, timeout: float, command: str, scales: bool,
            out: str | None = None):
    """Run one command of a multi-process run (or, without one, just run it): join or reuse the run, send
    this process's output to ``<out>.process<N>.log`` unless it is process 0, watch the others, and at the
    end wait for process 0's writes. Errors leave the block for the caller, which ends the run with
    :func:`fail` (errors it words as one line) or :func:`crash` (any other)."""
    global _session
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if _session is None:
        cluster = None if num_processes == 1 or not scales else _detected_cluster()
        if num_processes == 1 or not (explicit or cluster):
            yield
            return
        if not scales:
            raise UserError(f"xprune {command} runs in one process; drop {FLAGS_TEXT} (predict, eval, score and "
                            "finetune spread over processes)")
        _session = _join(coordinator_address, num_processes, process_id, timeout, cluster, command)
        _session.terminal = os.fdopen(os.dup(2), "w", buffering=1)
        if _session.processes > 1:
            watchdog = threading.Thread(target=_watch, args=(_session,), daemon=True, name="xprune-watchdog")
            watchdog.start()
            # at exit, before jax's own handler shuts the distributed client down (handlers run last-in first-out):
            # a watchdog inside a client call then would abort the process ("terminate called after throwing")
            atexit.register(_stop_watchdog, _session, watchdog)
    elif explicit and num_processes != 1 and (num_processes, process_id) != (_session.processes, _session.index):
        raise UserError(f"this process already belongs to a run of {_session.processes} processes as process "
                        f"{_session.index}; start a new process for another run")
    if not active():
        yield
        return
    _session.command, _session.commands = command, _session.commands + 1
    _session.log = f"{os.path.abspath(out).rstrip('/')}.process{_session.index}.log" if out and _session.index else None
    with _output_to(_session.log):
        yield
    _finish(_session)


def crash(error: BaseException) -> None:
    """End this process of a multi-process run after an error the caller does not word itself (a bug, an
    interrupt): the traceback goes to its log, one line to its terminal, and the others stop too. Nothing
    outside a multi-process run (the caller raises as usual)."""
    if not active():
        return
    text = "".join(traceback.format_exception(error))
    try:
        if _session.log:
            with open(_session.log, "a") as log:
                log.write(text)
        else:
            print(text, file=sys.stderr, flush=True)
    except OSError:
        pass
    if isinstance(error, KeyboardInterrupt):
        _exit_with("interrupted", status=130)
    if isinstance(error, jax.errors.JaxRuntimeError):  # a collective failed: if a peer died, the watchdog names it
        time.sleep(_session.timeout + 2 * POLL_SECONDS)
    where = f" (traceback in {_session.log})" if _session.log else ""
    _exit_with(f"{error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}{where}", status=1)


@contextlib.contextmanager
def _output_to(path: str | None):
    """Send this process's stdout (Python's and the C++ libraries') and Python's stderr to ``path``."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    saved_fd = os.dup(1)
    old_out, old_err = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        sys.stdout = sys.stderr = log
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def fail(message: str, status: int = 2) -> None:
    """End this process of a multi-process run with ``message`` as its one-line error; the others stop
    too, quoting it."""
    _exit_with(message, post=True, status=status)


def _line(message) -> str:
    return " ".join(str(message).split())


def _exit_with(message: str, post: bool = True, status: int = 2, command: str = "") -> None:
    _stopping.acquire()  # the first reason wins; any later caller waits here until the process ends
    session = _session
    command = session.command if session and session.command else command
    message = _line(message)
    if post and session is not None:
        try:
            _client().key_value_set(f"xprune/stop/{session.index}", message, allow_overwrite=True)
        except Exception:
            pass  # the coordinator is gone: the others learn it from JAX
    text = f"xprune{' ' + command if command else ''}: error: {message}"
    try:
        print(text, file=session.terminal if session and session.terminal else sys.stderr, flush=True)
        if session and session.log:
            with open(session.log, "a") as log:
                print(text, file=log)
    except Exception:
        pass
    if post and session is not None and session.index == 0:
        time.sleep(2 * POLL_SECONDS)  # the coordinator goes with this process: let the others read why first
    os._exit(status)


def _stop_watchdog(session: Session, watchdog: threading.Thread) -> None:
    session.closing.set()
    watchdog.join(timeout=10 * POLL_SECONDS)


def _watch(session: Session) -> None:
    """Heartbeats, and stop with one line when a peer falls silent or reports an error."""
    client, me, beat = _client(), session.index, 0
    started = time.monotonic()
    seen: dict[int, tuple[str | None, float]] = {}
    while not session.closing.is_set():
        beat += 1
        try:
            client.key_value_set(f"xprune/beat/{me}", str(beat), allow_overwrite=True)
            beats = dict(client.key_value_dir_get("xprune/beat/"))
            stops = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in client.key_value_dir_get("xprune/stop/"))
        except Exception as e:
            _exit_with(f"lost the coordinator at {session.coordinator} ({_line(e)[:200]}): process 0 stopped or the "
                       "network failed; see its output", post=False)
        stops = [(p, v) for p, v in stops if p != me]
        if stops:
            _exit_with(f"process {stops[0][0]} stopped: {stops[0][1]}", post=False)
        now = time.monotonic()
        for p in range(session.processes):
            if p == me:
                continue
            value = beats.get(f"xprune/beat/{p}")
            if p not in seen or seen[p][0] != value:
                seen[p] = (value, now if p in seen else started)
            elif now - seen[p][1] > session.timeout:
                _exit_with(f"process {p} has not answered for {session.timeout:g} s (it crashed, was killed or hangs); "
                           f"see its log or terminal", post=True)
        session.closing.wait(POLL_SECONDS)


def _finish(session: Session) -> None:
    """The end of a command: process 0 (which wrote the results) says so; the others wait for that."""
    key = f"xprune/done/{session.commands}"
    client = _client()
    if session.index == 0:
        client.key_value_set(key, "1", allow_overwrite=True)
        return
    while True:
        try:
            client.blocking_key_value_get(key, int(POLL_SECONDS * 10_000))
            return
        except Exception:  # not yet (the watchdog ends this process if process 0 has failed)
            time.sleep(POLL_SECONDS)
