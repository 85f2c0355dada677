"""Convert torchtitan DCP checkpoints into consolidated files that torchtune loads as they are.

    python convert.py experiment=debug
    python convert.py -m experiment=debug,500M,debug_pretrained
    python convert.py -m experiment=debug,500M,debug_pretrained hydra/launcher=slurm

See README.md for every setting.
"""

import gc

# Importing torch and Hydra creates a few hundred thousand objects that live as long as the
# process, and the cyclic collector would walk them over and over while they load: off until
# the job starts, and then they are frozen out of its reach (see main).
gc.disable()

import os
import signal
import sys


def _stop_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _stopped_while_starting(signum: int, frame: object) -> None:
    """A stop while torch and Hydra load (a second or more): nothing is written yet, so one
    line says so, instead of the traceback of whichever import it cut short."""
    said = f"Interrupted ({_stop_name(signum)}) while starting: nothing was written.\n"
    os.write(2, said.encode())
    os._exit(128 + signum)


# A signal ignored already stays ignored: nohup ignores SIGHUP so the run outlives its terminal.
_STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
if __name__ == "__main__":
    for stopping in _STOPPING:
        if signal.getsignal(stopping) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(stopping, _stopped_while_starting)

import logging
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from converter import job
from converter.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="convert")
def main(cfg: DictConfig) -> job.JobResult:
    if not gc.isenabled():  # the first job of the process; a sweep's others find it on
        gc.freeze()
        gc.enable()
    result = job.run(cfg)
    # A single run fails the process; in a sweep every job runs to its end and the summary
    # callback fails the sweep, so one broken checkpoint does not stop the others.
    if not result.ok and HydraConfig.get().mode == RunMode.RUN:
        sys.exit(1)
    return result


def _broken_yaml(argv: list[str]) -> str | None:
    """A YAML syntax error in a --config-dir file that the command line chooses (an
    experiment, a preset: ``group=option``, or ``--config-name``), in one paragraph that names
    the file and the line: Hydra reports it with a traceback of its config loader."""
    folders = _flag_values(argv, "--config-dir", "-cd")
    names = [f"{n}.yaml" for n in _flag_values(argv, "--config-name", "-cn")]
    for override in argv:
        key, _, values = override.lstrip("+~").partition("=")
        if values and not override.startswith("-"):
            names += [f"{key}/{v.strip()}.yaml" for v in values.split(",")]
    for path in (Path(f) / n for f in folders for n in names):
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as e:
            return f"{path} is not valid YAML: {' '.join(str(e).split())}. Fix it, then run again."
        except OSError:
            continue  # not there, or not a file: Hydra looks elsewhere, and says so
    return None


def _flag_values(argv: list[str], *flags: str) -> list[str]:
    """The values given to ``flags`` (``--flag value`` or ``--flag=value``)."""
    found = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags]
    return found + [a.split("=", 1)[1] for a in argv if a.split("=", 1)[0] in flags and "=" in a]


def _single_mode_only(argv: list[str]) -> str | None:
    """Hydra refuses -m together with --cfg or --info with a traceback; say it in one line."""
    multirun = {"-m", "--multirun"} & set(argv)
    shown = {"-c", "--cfg", "-i", "--info"} & set(argv)
    if multirun and shown:
        flag = sorted(shown)[0]
        example = f"{flag} job" if flag in ("-c", "--cfg") else flag
        return (
            f"{flag} shows one job's config, and -m runs a sweep: drop -m and give one value "
            f"per key to see that job (python convert.py experiment=debug {example})."
        )
    return None


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (kill, a closed terminal, a local launcher stopping): handled as Ctrl-C
    is, so the job removes its partial files and lock on the way out, rather than the default
    action leaving them behind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def _exit_code(code: object) -> int:
    """The exit status that ``sys.exit(code)`` gives."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    # Past a file size limit (ulimit -f) the kernel sends SIGXFSZ, whose default action kills
    # the process before it can clean up. Ignored, the write fails with EFBIG instead, and the
    # job reports it and removes its partial output. (CPython ignores it at start-up already;
    # this states that the job relies on it.)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # From here a stop is the job's to handle: Ctrl-C raises KeyboardInterrupt, and SIGTERM
    # and SIGHUP are made to. Under SLURM, submitit's own handlers take them in the job's
    # process (this is not it).
    for stopping in _STOPPING:
        if signal.getsignal(stopping) is _stopped_while_starting:
            signal.signal(
                stopping, signal.default_int_handler if stopping == signal.SIGINT else _stop
            )
    if conflict := _single_mode_only(sys.argv[1:]):
        print(conflict, file=sys.stderr)
        sys.exit(2)
    if broken := _broken_yaml(sys.argv[1:]):
        print(broken, file=sys.stderr)
        sys.exit(1)
    # Hydra composes the config before it prints --help, and the experiment group has no
    # default: name one, so that the help lists the experiments instead of failing.
    asks_help = {"-h", "--help"} & set(sys.argv[1:])
    if asks_help and not any(a.startswith("experiment=") for a in sys.argv[1:]):
        sys.argv.append("experiment=debug")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt as e:
        # The job has already removed its partial file and lock on the way out.
        signum = e.signum if isinstance(e, _Stopped) else signal.SIGINT
        # A stop during a publish takes effect once it is done (converter.publish): the job
        # under way left its output whole, or nothing.
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            said = (
                "the sweep stopped. The job under way in this process left no partial output "
                "(its log says if it published one as the stop came); the outputs of jobs that "
                "had ended stay, and jobs a launcher runs in processes of their own "
                "(hydra/launcher=slurm, submitit_local) go on: see their logs"
            )
        else:
            said = "no partial output was left (the log says if one was published as it came)"
        print(f"Interrupted ({_stop_name(signum)}): {said}.", file=sys.stderr)
        code = 128 + signum
    # Everything the job wrote is synced and closed by now. Tearing down the interpreter
    # (freeing torch's modules one by one) took 1.4 s of a 10 s conversion here: skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
