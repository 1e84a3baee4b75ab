"""amrg.errors (one base type, kinds, ``reading``/``writing``) and how the `amrg` command prints them."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from amrg import cli
from amrg.errors import AmrgError, CheckpointError, ConfigError, InputError, OutputError, reading, writing


# ---- the kinds -----------------------------------------------------------------------------------------
def test_each_kind_is_also_the_builtin_type_older_code_catches() -> None:
    assert issubclass(InputError, AmrgError) and issubclass(InputError, ValueError)
    assert issubclass(ConfigError, AmrgError) and issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, InputError)
    assert issubclass(OutputError, AmrgError) and issubclass(OutputError, OSError)


def test_the_existing_error_classes_are_amrg_errors() -> None:
    from amrg.checkpoints.safety import UntrustedCheckpointError
    from amrg.data.images import BadImageError
    from amrg.data.schema import AnnotationError
    from amrg.metrics.evaluate import EvalInputError
    from amrg.predict import PredictInputError

    for kind in (AnnotationError, BadImageError, EvalInputError, PredictInputError):
        assert issubclass(kind, InputError), kind
    assert issubclass(UntrustedCheckpointError, CheckpointError)


# ---- reading / writing ----------------------------------------------------------------------------------
def test_reading_names_the_file_for_each_failure(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with (
        pytest.raises(InputError, match=r"^annotation '.*nope.json' not found$"),
        reading(missing, "annotation"),
    ):
        missing.read_text()
    with pytest.raises(InputError, match=r"is a folder, expected a file$"), reading(tmp_path, "annotation"):
        tmp_path.read_text()
    bad_json = tmp_path / "a.json"
    bad_json.write_text('{"a": 1,\n  oops}')
    with pytest.raises(InputError, match=r"a.json': not valid JSON at line 2, column 3: "), reading(bad_json):
        json.loads(bad_json.read_text())
    latin = tmp_path / "r.txt"
    latin.write_bytes(b"fine\nfine\ncaf\xe9\n")
    with (
        pytest.raises(InputError, match=r"r.txt': not UTF-8 text \(line 3: byte e9 is not UTF-8\)"),
        reading(latin, "report"),
    ):
        latin.read_text(encoding="utf-8")
    with pytest.raises(InputError, match=r"cannot be read: permission denied"), reading(latin):
        raise PermissionError(errno.EACCES, "Permission denied", str(latin))  # root ignores chmod


def test_reading_lets_amrg_errors_and_other_exceptions_through(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^as it was$"), reading(tmp_path / "x"):
        raise ConfigError("as it was")
    with pytest.raises(KeyError), reading(tmp_path / "x"):
        raise KeyError("a bug stays a bug")


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.EACCES, "permission denied"),
        (errno.ENOSPC, "no space left on the device"),
        (errno.EROFS, "read-only file system"),
        (errno.EFBIG, "file too large for the file system"),
        (errno.ENOENT, "its folder does not exist"),
    ],
)
def test_writing_names_the_target_not_the_temp_file(tmp_path: Path, code: int, reason: str) -> None:
    target = tmp_path / "pred.jsonl"
    with pytest.raises(OutputError) as info, writing(target, "predictions"):
        raise OSError(code, "whatever the OS says", str(tmp_path / ".pred.jsonl.tmp123"))
    assert str(info.value) == f"cannot write predictions '{target}': {reason}"
    assert isinstance(info.value, OSError) and isinstance(info.value.__cause__, OSError)


def test_writing_a_real_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match=r"cannot write output '.*a_file/out.txt'"):
        with writing(tmp_path / "a_file" / "out.txt"):
            (tmp_path / "a_file" / "out.txt").write_text("y")


# ---- the command: one line, --debug, AMRG_DEBUG ---------------------------------------------------------
@pytest.fixture
def command(monkeypatch: pytest.MonkeyPatch):
    """``command(exc)``: make the `amrg` command's body raise ``exc``; returns the argv it was given."""
    monkeypatch.delenv("AMRG_DEBUG", raising=False)
    seen: list[list[str]] = []

    def install(exc: BaseException) -> list[list[str]]:
        def body(argv: list[str], given: bool) -> None:
            seen.append(argv)
            raise exc

        monkeypatch.setattr(cli, "_run", body)
        return seen

    return install


def _main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


def test_an_amrg_error_is_one_line_with_its_list_folded(command, capsys) -> None:
    command(
        InputError(
            "cannot predict: 2 problem(s) with the inputs:\n  - 'a.png' not found\n  - 'b.txt' is not an image"
        )
    )
    code, err = _main(["predict-images"], capsys)
    assert code == 1
    assert (
        err
        == "amrg: error: cannot predict: 2 problem(s) with the inputs: 'a.png' not found; 'b.txt' is not an image\n"
    )


def test_an_amrg_error_wrapped_by_a_library_is_found(command, capsys) -> None:
    try:
        raise CheckpointError("--ckpt_path 'x.ckpt' is empty")
    except CheckpointError as inner:
        outer = RuntimeError("Problem in instantiating the model")
        outer.__cause__ = inner
    command(outer)
    assert _main(["fit"], capsys) == (1, "amrg: error: --ckpt_path 'x.ckpt' is empty\n")


def test_an_amrg_error_from_a_dataloader_worker_is_its_own_message(command, capsys) -> None:
    from amrg.data.images import BadImageError

    worker = (
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "/x/worker.py", line 349, in _worker_loop\n    data = fetcher.fetch(index)\n'
        "amrg.data.images.BadImageError: image a/0.png is unreadable or corrupt: truncated\n"
    )
    command(BadImageError(worker))  # how torch re-raises a worker's exception
    assert _main(["fit"], capsys)[1] == (
        "amrg: error: image a/0.png is unreadable or corrupt: truncated (in a DataLoader worker)\n"
    )


def test_os_and_decoding_errors_on_a_user_file_name_it(command, capsys, tmp_path: Path) -> None:
    try:
        open(tmp_path / "gone.json")  # noqa: SIM115 - the OS's own error, with its filename
    except FileNotFoundError as err:
        command(err)
    assert _main(["data"], capsys) == (
        1,
        f"amrg: error: '{tmp_path / 'gone.json'}': no such file or directory\n",
    )
    command(FileNotFoundError("annotation file x.json not found (set data.init_args.annotation)"))
    assert (
        _main(["data"], capsys)[1]
        == "amrg: error: annotation file x.json not found (set data.init_args.annotation)\n"
    )
    command(json.JSONDecodeError("Expecting value", "{\n x", 3))
    assert _main(["data"], capsys)[1] == "amrg: error: not valid JSON at line 2, column 2: Expecting value\n"
    command(UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"))
    assert _main(["data"], capsys)[1] == "amrg: error: not UTF-8 text: byte ff at offset 2\n"


def test_a_bug_keeps_its_traceback(command) -> None:
    command(ValueError("an internal invariant"))
    with pytest.raises(ValueError, match="an internal invariant"):
        cli.main(["data"])


def test_interrupt_is_one_line_and_status_130(command, capsys) -> None:
    command(KeyboardInterrupt())
    assert _main(["fit"], capsys) == (130, "amrg: error: interrupted\n")


def test_debug_anywhere_reraises_and_is_removed_before_parsing(command) -> None:
    seen = command(InputError("bad"))
    with pytest.raises(InputError, match="^bad$"):
        cli.main(["data", "--debug", "check", "x.json"])
    assert seen == [["data", "check", "x.json"]]


@pytest.mark.parametrize(("value", "reraised"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_amrg_debug_in_the_environment(command, monkeypatch, capsys, value: str, reraised: bool) -> None:
    command(InputError("bad"))
    monkeypatch.setenv("AMRG_DEBUG", value)
    if reraised:
        with pytest.raises(InputError):
            cli.main(["data"])
    else:
        assert _main(["data"], capsys) == (1, "amrg: error: bad\n")


def test_usage_text_documents_the_errors_and_debug(capsys) -> None:
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert "amrg: error: <message>" in out and "--debug" in out and "AMRG_DEBUG=1" in out


def test_the_data_check_pixel_cap_default_is_the_library_one() -> None:
    import inspect

    from amrg.data.images import DEFAULT_MAX_PIXELS

    assert inspect.signature(cli.data_check).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS


def _amrg(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full = {k: v for k, v in os.environ.items() if k != "AMRG_DEBUG"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "amrg.cli", *args], capture_output=True, text=True, env=full, timeout=300
    )


def test_from_the_console_one_line_or_the_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    plain = _amrg("data", "check", missing)
    assert (plain.returncode, plain.stderr) == (
        1,
        f"amrg: error: annotation file {missing} not found (set data.init_args.annotation)\n",
    )
    for debug in (
        _amrg("data", "check", missing, "--debug"),
        _amrg("data", "check", missing, env={"AMRG_DEBUG": "1"}),
    ):
        assert debug.returncode == 1
        assert debug.stderr.startswith("Traceback (most recent call last):")
        assert debug.stderr.rstrip().endswith(
            f"FileNotFoundError: annotation file {missing} not found (set data.init_args.annotation)"
        )
    usage = _amrg("data", "check")  # a usage error keeps jsonargparse's usage and status 2
    assert usage.returncode == 2 and "usage: amrg data" in usage.stderr and "amrg: error:" not in usage.stderr
