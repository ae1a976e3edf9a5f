"""Input checks of `corolla sweep` and run labels of `corolla report`.

The sweep checks run on the real parser and planner, and those that need a run use tiny
in-process runs (digits or fair-cps1988, one round). Tests import the newer helpers
(``parse_entries``, ``plan_sweep``, ``run_labels`` and the figure builders) in their body, so
that a missing helper fails only the tests that use it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from corolla.cli import main
from simulations.experiments import ConfigError, resolve_run_config
from simulations.inprocess import run_inprocess
from simulations.report import compare_runs, plot_client_accuracy
from simulations.sweep import parse_entry, parse_seeds, run_sweep

# Two IID digits clients and one round, so that a run takes seconds.
SMALL = {"num-clients": 2, "num-server-rounds": 1, "partition": "iid", "client-threads": 1}


def sweep_command(out: Path, strategies: str, seeds: str = "0", *options: str) -> list[str]:
    """Return `corolla sweep` arguments for one-round fair-cps1988 runs into ``out``."""
    return ["sweep", "fair-cps1988", "--strategies", strategies, "--seeds", seeds, "--set", "num-server-rounds=1", *options, "--out", str(out)]


def entries_of(text: str):
    return [parse_entry(part) for part in text.split(",")]


# Repeated entries and seeds


@pytest.mark.parametrize(
    ("strategies", "first", "second"),
    [
        ("fedavg,fedavg", "'fedavg'", "'fedavg'"),
        ("qffl:q=0.1,qffl:q=1e-1", "'qffl:q=0.1'", "'qffl:q=1e-1'"),
        ("qffl:q=1,qffl:q=1.0", "'qffl:q=1'", "'qffl:q=1.0'"),
    ],
)
def test_sweep_rejects_repeated_entries(tmp_path, capsys, strategies, first, second):
    out = tmp_path / "sweep"

    code = main(sweep_command(out, strategies))
    error = capsys.readouterr().err

    assert code == 2
    assert "same run config" in error
    assert f"1 ({first})" in error
    assert f"2 ({second})" in error
    assert not out.exists()


def test_sweep_rejects_repeated_seeds(tmp_path, capsys):
    out = tmp_path / "sweep"

    code = main(sweep_command(out, "fedavg", "0,0"))

    assert code == 2
    assert "repeated seed 0" in capsys.readouterr().err
    assert not out.exists()


def test_run_sweep_rejects_repeated_seeds(tmp_path):
    with pytest.raises(ConfigError, match="repeated seed 1"):
        run_sweep("digits-fedavg", entries_of("fedavg"), [1, 2, 1], SMALL, tmp_path / "sweep")

    assert not (tmp_path / "sweep").exists()


def test_parse_seeds_rejects_bad_items():
    with pytest.raises(ConfigError, match=r"'0,,1': item 2 is empty"):
        parse_seeds("0,,1")
    with pytest.raises(ConfigError, match=r"'0,1,': item 3 is empty"):
        parse_seeds("0,1,")
    with pytest.raises(ConfigError, match="repeated seed 0"):
        parse_seeds("0,00")
    with pytest.raises(ConfigError, match="it is empty"):
        parse_seeds(" ")


# Empty lists, entries and parts


@pytest.mark.parametrize(
    ("strategies", "message"),
    [("", "it is empty"), (",,", "entry 1 is empty"), ("fedavg,,tch", "entry 2 is empty")],
)
def test_sweep_rejects_empty_entries(tmp_path, capsys, strategies, message):
    out = tmp_path / "sweep"

    code = main(sweep_command(out, strategies))

    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_run_sweep_rejects_no_entries(tmp_path):
    with pytest.raises(ConfigError, match="no entries"):
        run_sweep("digits-fedavg", [], [0], SMALL, tmp_path / "sweep")


def test_sweep_rejects_repeated_set_key(tmp_path, capsys):
    out = tmp_path / "sweep"

    code = main(sweep_command(out, "fedavg", "0", "--set", "lr=0.1", "--set", "lr=0.2"))

    assert code == 2
    assert "--set lr is given twice (0.1 and 0.2)" in capsys.readouterr().err
    assert not out.exists()


def test_entry_setting_for_another_strategy_is_rejected(tmp_path):
    out = tmp_path / "sweep"

    with pytest.raises(ConfigError, match="'fedavg' does not use q"):
        run_sweep("digits-fedavg", entries_of("tch,fedavg:q=0.5"), [0], SMALL, out)

    assert not out.exists()


def test_parse_entries_rejects_empty_entries():
    from simulations.sweep import parse_entries

    with pytest.raises(ConfigError, match=r"'fedavg,,tch': entry 2 is empty"):
        parse_entries("fedavg,,tch")
    with pytest.raises(ConfigError, match=r"',,': entry 1 is empty"):
        parse_entries(",,")
    with pytest.raises(ConfigError, match=r"'fedavg,': entry 2 is empty"):
        parse_entries("fedavg,")
    with pytest.raises(ConfigError, match=r"--strategies '': it is empty"):
        parse_entries("")
    assert [entry.label for entry in parse_entries("fedavg, tch")] == ["fedavg", "tch"]


def test_parse_entry_rejects_empty_parts():
    with pytest.raises(ConfigError, match="'fedavg::': the part after colon 1 is empty"):
        parse_entry("fedavg::")
    with pytest.raises(ConfigError, match="'qffl:q=0.5:': the part after colon 2 is empty"):
        parse_entry("qffl:q=0.5:")
    with pytest.raises(ConfigError, match="':lr=0.1': the strategy name is missing"):
        parse_entry(":lr=0.1")


def test_parse_entry_rejects_repeated_key():
    with pytest.raises(ConfigError, match="sets lr twice"):
        parse_entry("fedavg:lr=0.1:lr=0.2")


# Keys the sweep sets itself


@pytest.mark.parametrize(
    ("pair", "hint"),
    [
        ("seed=7", "--seeds"),
        ("strategy=tch", "--strategies"),
        ("out-dir=/tmp/elsewhere", "--out"),
        ("experiment=digits-fedavg", "EXPERIMENT argument"),
    ],
)
def test_sweep_rejects_set_of_sweep_keys(tmp_path, capsys, pair, hint):
    out = tmp_path / "sweep"

    code = main(sweep_command(out, "fedavg", "0", "--set", pair))
    error = capsys.readouterr().err

    assert code == 2
    assert f"Invalid --set {pair}" in error
    assert hint in error
    assert not out.exists()


@pytest.mark.parametrize(("text", "hint"), [("fedavg:experiment=/../../escaped", "EXPERIMENT argument"), ("fedavg:out-dir=/tmp/x", "--out")])
def test_entry_rejects_sweep_keys(text, hint):
    with pytest.raises(ConfigError, match="the sweep sets") as raised:
        parse_entry(text)

    assert text in str(raised.value)
    assert hint in str(raised.value)


# Run-directory names


def test_run_directory_name_is_one_component():
    from simulations.sweep import run_directory_name

    assert run_directory_name("omd-tch[eta-lambda=0.5]") == "omd-tch[eta-lambda=0.5]"
    assert run_directory_name("fedavg[data-dir=/../../escaped]") == "fedavg[data-dir=_.._.._escaped]"
    assert run_directory_name("fedavg[dataset=a b|c]") == "fedavg[dataset=a_b_c]"
    assert run_directory_name("..") == "__"
    assert run_directory_name(".") == "_"


def test_entry_values_stay_under_out(tmp_path):
    from simulations.sweep import plan_sweep

    out = tmp_path / "sweep"
    entries = entries_of("fedavg:transfer-data-dir=/../../escaped,fedavg:transfer-data-dir=a/b/c")

    planned = plan_sweep("digits-fedavg", entries, [0, 1], SMALL, out)

    assert len(planned) == 4
    for run in planned:
        assert run.run_dir.parent.parent == out.resolve()
        assert run.config["out-dir"] == str(run.run_dir)


@pytest.mark.parametrize(
    ("strategies", "expected"),
    [
        ("fedavg:transfer-data-dir=a/b,fedavg:transfer-data-dir=a_b", "the same run directory"),
        ("fedavg:transfer-data-dir=A,fedavg:transfer-data-dir=a", "case-insensitive file systems"),
    ],
)
def test_sweep_rejects_shared_run_directory(tmp_path, strategies, expected):
    out = tmp_path / "sweep"
    first, second = strategies.split(",")

    with pytest.raises(ConfigError, match=expected) as raised:
        run_sweep("digits-fedavg", entries_of(strategies), [0], SMALL, out)

    assert f"1 ({first!r})" in str(raised.value)
    assert f"2 ({second!r})" in str(raised.value)
    assert not out.exists()


# Checks before the first run


@pytest.mark.parametrize(
    ("strategies", "invalid"),
    [
        ("fedavg,qffl:q=x", "'x'"),
        ("fedavg,qffl:q=-1", "q = -1.0"),
        ("fedavg,tch:preference-weights='1'", "preference-weights has 1 values"),
        ("fedavg,fedavg:dataset=nope", "Unknown dataset 'nope'"),
        ("fedavg,fedavg:extensions=nope", "Unknown run extension 'nope'"),
    ],
)
def test_invalid_entry_fails_before_training(tmp_path, strategies, invalid):
    out = tmp_path / "sweep"
    second = strategies.split(",")[1]

    with pytest.raises(ValueError) as raised:
        run_sweep("digits-fedavg", entries_of(strategies), [0, 1], SMALL, out)

    assert not out.exists()
    assert isinstance(raised.value, ConfigError)
    assert f"Invalid sweep entry 2 ({second!r})" in str(raised.value)
    assert invalid in str(raised.value)


def test_invalid_set_value_fails_before_training(tmp_path, capsys):
    out = tmp_path / "sweep"

    code = main(sweep_command(out, "fedavg", "0", "--set", "extensions=nope"))

    assert code == 2
    assert not out.exists()
    assert "Invalid --set value: Unknown run extension 'nope'" in capsys.readouterr().err


# Report labels


@pytest.fixture(scope="module")
def report_runs(tmp_path_factory):
    """Two sweep runs with the fairness extension and one run without it, all named seed-0."""
    base = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_HOME", str(base / "flwr-home"))
        patch.setenv("FLWR_TELEMETRY_ENABLED", "0")
        outcomes = run_sweep("digits-fedavg", entries_of("fedavg,qffl:q=0.1"), [0], SMALL, base / "sweep")
        plain = resolve_run_config("digits-fedavg", {**SMALL, "out-dir": str(base / "plain" / "seed-0")})
        run_inprocess(plain)
    return [Path(outcome.run_dir) for outcome in outcomes] + [Path(str(plain["out-dir"]))]


def test_run_labels_use_shortest_unique_tail(tmp_path):
    from simulations.report import run_labels

    tmp_path = tmp_path.resolve()
    runs = [tmp_path / "a" / "fedavg" / "seed-0", tmp_path / "a" / "tch" / "seed-0", tmp_path / "b" / "c", tmp_path / "d" / "b" / "c"]

    assert run_labels(runs) == ["fedavg/seed-0", "tch/seed-0", str(runs[2].relative_to(tmp_path.parent)), "d/b/c"]


def test_report_table_labels_sweep_runs(report_runs, tmp_path, capsys):
    code = main(["report", *map(str, report_runs), "--out", str(tmp_path / "report.png")])
    lines = capsys.readouterr().out.splitlines()

    assert code == 0
    assert any(line.startswith("fedavg/seed-0 ") for line in lines)
    assert any(line.startswith("qffl[q=0.1]/seed-0 ") for line in lines)
    assert any(line.startswith("plain/seed-0 ") for line in lines)


def test_report_plots_label_sweep_runs(report_runs):
    from simulations.report import accuracy_figure, client_accuracy_figure, load_summary, run_labels

    labels = run_labels(report_runs)
    summaries = [load_summary(run) for run in report_runs]

    accuracy = accuracy_figure(labels, summaries)
    clients = client_accuracy_figure(labels[:2], summaries[:2])

    assert [text.get_text() for text in accuracy.axes[0].get_legend().get_texts()] == [
        "fedavg/seed-0 (fedavg)",
        "qffl[q=0.1]/seed-0 (qffl)",
        "plain/seed-0 (fedavg)",
    ]
    assert [text.get_text() for text in clients.axes[0].get_legend().get_texts()] == ["fedavg/seed-0 (fedavg)", "qffl[q=0.1]/seed-0 (qffl)"]


def test_client_plot_names_left_out_runs(report_runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="simulations.report"):
        plot = plot_client_accuracy(report_runs, tmp_path / "clients.png")
    warnings = [record.getMessage() for record in caplog.records if record.name == "simulations.report"]

    assert plot is not None
    assert len(warnings) == 1
    assert "leaves out plain/seed-0: no fairness section" in warnings[0]
    assert "fedavg/seed-0" not in warnings[0]


def test_report_rejects_repeated_run(report_runs, tmp_path):
    with pytest.raises(ValueError, match="given twice"):
        compare_runs([report_runs[0], report_runs[0]], tmp_path / "report.png")
