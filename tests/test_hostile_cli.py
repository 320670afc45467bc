"""Hardening, the command line: what a user can hand the commands (a config file, a run name,
a metrics endpoint, output paths, a run directory to plot, an encoder folder) fails early with
exit status 2 and one line naming the problem, never a traceback, and never runs code.

In process (``main([...])`` and the launch checks): each case costs milliseconds, not a
process start. A read-only mount cannot be made here without privileges, so the kernel's
answer (EROFS) is given by ``os.open`` for paths under one directory."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fne_dist import evaluate as evaluate_cmd
from fne_dist import plot as plot_cmd
from fne_dist import train as train_cmd
from fne_dist.config import (
    ConfigError,
    ImageEncoderConfig,
    TextEncoderConfig,
    load_config,
    save_config,
)
from fne_dist.encoders import EncoderUnavailable, build_image_backbone, check_available
from fne_dist.monitoring.serve import serve_metrics, write_targets

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _one_line_exit_2(code: int, capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """The command's status is 2 and its stderr one line holding ``words``."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Files cannot be created under ``directory``: ``os.open`` answers as on a read-only
    mount (EROFS), the call every file creation (O_TMPFILE, O_CREAT) goes through."""
    real = os.open
    inside = str(directory.resolve())

    def ro_open(path, flags, *args, **kwargs):
        where = os.path.abspath(os.fsdecode(path))
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writes and (where == inside or where.startswith(inside + os.sep)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), where)
        return real(path, flags, *args, **kwargs)

    os.open = ro_open
    try:
        yield
    finally:
        os.open = real


def _cfg(tmp_path: Path, *overrides: str):
    paths = [f"run.output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'c'}"]
    return load_config(TINY, [*paths, *overrides])


# ------------------------------------------------------------------------ the config file


def test_hostile_binary_config_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a config file that is not text (a PNG given by mistake) is one line naming
    the file, not a UnicodeDecodeError."""
    binary = tmp_path / "picture.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)
    _one_line_exit_2(train_cmd.main(["--config", str(binary)]), capsys, str(binary), "UTF-8")


@pytest.mark.parametrize("kind", ["device", "directory"])
def test_hostile_config_that_is_not_a_regular_file_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Invariant: /dev/zero (never ends) or a directory as --config is refused without reading
    it, as "not a regular file" (it exists: "not found" would send the user looking)."""
    path = Path("/dev/zero") if kind == "device" else tmp_path
    if not path.exists():
        pytest.skip("no /dev/zero here")
    code = train_cmd.main(["--config", str(path)])
    _one_line_exit_2(code, capsys, str(path), "not a regular file")


# ------------------------------------------------------------------------ run.name


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        (".", "output_dir itself"),
        ("./", "output_dir itself"),
        ("/tmp/elsewhere", "absolute"),
        ("..", "'..'"),
        ("../other-run", "'..'"),
        ("a/../../b", "'..'"),
        ("a\nb", "control character"),
    ],
)
def test_hostile_run_name_must_stay_inside_output_dir(name: str, problem: str) -> None:
    """Invariant: run.name names a directory inside run.output_dir: a name that would write
    the run loose into output_dir or outside it is refused at load, in one line."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"run.name={json.dumps(name)}"])
    assert "run.name=" in str(err.value) and problem in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["emoji-fne", "2024", "exp1/seed3", "a.b", "..hidden"])
def test_hostile_ordinary_run_names_are_accepted(name: str) -> None:
    assert load_config(None, [f'run.name="{name}"']).run.name == name


@pytest.mark.parametrize("key", ["run.name", "run.output_dir", "data.cache_dir"])
def test_hostile_nul_byte_in_a_config_text_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """Invariant: a NUL byte (YAML "\\0") in a name or path is refused at load, naming the
    key: the OS would cut the path there, and Python fails deep in the run."""
    section, field = key.split(".")
    path = tmp_path / "nul.yaml"
    path.write_text(f'base: {TINY}\n{section}:\n  {field}: "a\\0b"\n')
    where = [] if key == "run.output_dir" else [f"run.output_dir={tmp_path}"]
    code = train_cmd.main(["--config", str(path), *where])
    _one_line_exit_2(code, capsys, key, "NUL")


# ------------------------------------------------------------------------ /metrics endpoint


@pytest.mark.system  # it listens on the last port to make it busy
def test_hostile_last_port_busy_names_only_real_ports() -> None:
    """Invariant: monitor.port=65535 taken is one line that names port 65535 alone (ports end
    there: no range up to 65634), as a ConfigError (exit 2), not an OSError."""
    import prometheus_client

    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # already taken by someone else: as good
            taken.bind(("127.0.0.1", 65535))
            taken.listen()
        with pytest.raises(ConfigError) as err:
            serve_metrics(prometheus_client.CollectorRegistry(), "127.0.0.1", 65535)
    message = str(err.value)
    assert "65535" in message and "busy" in message and "656" not in message, message


def test_hostile_ports_of_local_ranks_past_65535_are_refused_at_launch() -> None:
    """Invariant: monitor.port + local rank beyond 65535 is found before the run starts."""
    from fne_dist.monitoring.serve import check_endpoint

    with pytest.raises(ConfigError, match="above 65535"):
        check_endpoint("127.0.0.1", 65535, local_ranks=2)
    check_endpoint("127.0.0.1", 65534, local_ranks=2)


def test_hostile_host_that_is_not_local_is_refused_at_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a monitor.host that is not an address of this machine (a TEST-NET address)
    fails at launch in one line naming monitor.host, before any training; binding the server
    there is the same ConfigError, not an OSError traceback."""
    import prometheus_client

    host = "203.0.113.7"
    cfg = _cfg(tmp_path, "monitor.prometheus=always", f"monitor.host={host}")
    with pytest.raises(ConfigError, match=f"monitor.host={host} is not an address"):
        train_cmd.check_launch(cfg, "local", {})
    with pytest.raises(ConfigError, match=r"monitor\.host"):
        serve_metrics(prometheus_client.CollectorRegistry(), host, 9400)
    args = ["--config", str(TINY), f"run.output_dir={tmp_path}", "monitor.prometheus=always"]
    _one_line_exit_2(train_cmd.main([*args, f"monitor.host={host}"]), capsys, "monitor.host")
    assert not (tmp_path / "tiny").exists()  # refused before the run directory was made


# ------------------------------------------------------------------------ output locations


def test_hostile_targets_file_that_is_a_directory(tmp_path: Path) -> None:
    """Invariant: monitor.targets_file naming a directory is refused at launch in one line,
    and a write that fails anyway leaves no stray temporary file next to it."""
    target = tmp_path / "sd"
    target.mkdir()
    cfg = _cfg(tmp_path, "monitor.prometheus=always", f"monitor.targets_file={target}")
    with pytest.raises(ConfigError, match=r"monitor\.targets_file=.*: is a directory"):
        train_cmd.check_launch(cfg, "local", {})
    with pytest.raises(OSError):
        write_targets(target, "r", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_hostile_targets_file_on_a_read_only_mount(tmp_path: Path) -> None:
    """Invariant: a targets file whose directory cannot be written is refused at launch, and
    the failed probe leaves nothing there."""
    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = _cfg(tmp_path, "monitor.prometheus=always", f"monitor.targets_file={ro / 't.json'}")
    with read_only(ro), pytest.raises(ConfigError) as err:
        train_cmd.check_launch(cfg, "local", {})
    assert "monitor.targets_file=" in str(err.value) and "Read-only" in str(err.value)
    assert list(ro.iterdir()) == []


def test_hostile_read_only_output_dir_fails_at_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a run.output_dir on a read-only mount, or with a file in its place, fails
    before anything runs, in one line naming run.output_dir, and leaves nothing behind."""
    ro = tmp_path / "ro"
    ro.mkdir()
    args = ["--config", str(TINY), f"data.cache_dir={tmp_path / 'c'}"]
    with read_only(ro):
        code = train_cmd.main([*args, f"run.output_dir={ro / 'runs'}"])
    _one_line_exit_2(code, capsys, f"run.output_dir={ro / 'runs'}", "Read-only")
    assert list(ro.iterdir()) == []
    (tmp_path / "file").write_text("x")
    code = train_cmd.main([*args, f"run.output_dir={tmp_path / 'file'}"])
    _one_line_exit_2(code, capsys, "run.output_dir=", "not a directory")


def test_hostile_writable_locations_pass_the_launch_checks(tmp_path: Path) -> None:
    """Invariant: the checks refuse only what cannot work: fresh nested paths are fine."""
    cfg = _cfg(
        tmp_path,
        "monitor.prometheus=always",
        f"monitor.targets_file={tmp_path / 'new' / 'sd' / 't.json'}",
    )
    train_cmd.check_launch(cfg, "local", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ fne_dist.plot


def _plottable_run(run: Path) -> None:
    """A run directory the plot command draws (config, metrics, a log of three lines)."""
    run.mkdir()
    save_config(load_config(TINY), run / "config.yaml")
    metrics = {"val": {"rsum": 30.0}, "test": {"rsum": None}, "steps": 3, "world_size": 1,
               "history": [{"step": 2, "val": {"rsum": 12.0}}]}  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    lines = [{"step": s, "time": 100.0 + s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (run / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.mark.parametrize(
    "metrics",
    [
        "[]",
        "{",
        '{"history": 5}',
        '{"val": 3, "steps": 1}',
        '{"val": {"rsum": 1.0}}',
        '{"world_size": "two"}',
        '{"history": [{"step": 1, "val": {}}]}',
        '{"history": [7]}',
    ],
)
def test_hostile_plot_of_metrics_of_the_wrong_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], metrics: str
) -> None:
    """Invariant: a metrics.json that is not what a run writes is one line naming it."""
    run = tmp_path / "run"
    _plottable_run(run)
    (run / "metrics.json").write_text(metrics)
    _one_line_exit_2(plot_cmd.main([str(run)]), capsys, "metrics.json")


def test_hostile_plot_skips_a_torn_last_log_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a last train_log.jsonl line cut by a kill is skipped (as the loop does on
    resume): the pictures are drawn from the whole lines."""
    run = tmp_path / "run"
    _plottable_run(run)
    with (run / "train_log.jsonl").open("a") as f:
        f.write('{"step": 4, "time": 10')
    assert plot_cmd.main([str(run)]) == 0, capsys.readouterr().err
    assert (run / "plots" / "training.png").stat().st_size > 0
    assert [r["step"] for r in plot_cmd.read_log(run)] == [1, 2, 3]


@pytest.mark.parametrize("snapshot", ["{}", "[]", '{"step": 1, "gaussians": {}}', "NaN"])
def test_hostile_plot_of_a_snapshot_of_the_wrong_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], snapshot: str
) -> None:
    """Invariant: an evaluation snapshot (plots/fne-step-*.json) that is not what a run
    writes is one line naming it."""
    run = tmp_path / "run"
    _plottable_run(run)
    (run / "plots").mkdir()
    (run / "plots" / "fne-step-00000002.json").write_text(snapshot)
    _one_line_exit_2(plot_cmd.main([str(run)]), capsys, "fne-step-00000002.json")


@pytest.mark.parametrize("bad", ["not json at all", "[1, 2]", '{"time": 1.0}', "\x00\x00"])
def test_hostile_plot_of_a_bad_line_inside_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    """Invariant: a line that is not a log record in the middle of train_log.jsonl is one
    line naming the file and the line number (only the last line can be torn by a kill)."""
    run = tmp_path / "run"
    _plottable_run(run)
    lines = (run / "train_log.jsonl").read_text().splitlines()
    (run / "train_log.jsonl").write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n")
    _one_line_exit_2(plot_cmd.main([str(run)]), capsys, "train_log.jsonl", "line 2")


# ------------------------------------------------------------------------ fne_dist.evaluate


def test_hostile_evaluate_prints_strict_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: metrics not measured (NaN: group recall without group labels) are null on
    evaluate's stdout, as in the run's logs: strict JSON any parser reads."""
    monkeypatch.setattr(evaluate_cmd, "load_weights", lambda path: {})
    monkeypatch.setattr(
        evaluate_cmd,
        "evaluate_weights",
        lambda *a, **k: {"rsum": 12.5, "group_rsum": float("nan"), "r1": float("inf")},
    )
    assert evaluate_cmd.main(["--weights", "w.safetensors", "--config", str(TINY)]) == 0

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    out = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert out == {"rsum": 12.5, "group_rsum": None, "r1": None}


# ------------------------------------------------------------------------ pickled HF weights


class _Payload:
    """Unpickling this creates the file ``marker``: proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickled_hf_folder(folder: Path, marker: Path) -> None:
    """A ViT folder as save_pretrained writes it, but with a pickle as its weights."""
    folder.mkdir()
    config = {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 24,
              "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 48}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))


def test_hostile_pickled_hf_weights_are_refused_and_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: an encoder folder whose weights are a pickle (pytorch_model.bin) is refused
    in one line naming the file, at launch (check_available) and when built, and the pickle is
    never read: nothing it would run runs, torch.load is never called."""
    folder, marker = tmp_path / "vit", tmp_path / "pwned"
    _pickled_hf_folder(folder, marker)

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on the encoder folder")

    monkeypatch.setattr(torch, "load", no_load)
    image = ImageEncoderConfig(type="hf", name_or_path=str(folder), image_size=32)
    with pytest.raises(EncoderUnavailable) as err:
        check_available(image, TextEncoderConfig(name_or_path="tiny"))
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "\n" not in message
    with pytest.raises(EncoderUnavailable, match=r"pytorch_model\.bin"):
        build_image_backbone(image)
    assert not marker.exists()
