"""The model matrix of run_all.sh: parsing, the plan, skipped models, papermill arguments."""

from pathlib import Path

import pytest

from locus import matrix


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "matrix.txt"
    path.write_text(text)
    return path


def test_the_committed_matrix_covers_every_notebook_once_with_its_defaults():
    runs = matrix.read_matrix()
    notebooks = matrix.find_notebooks()
    assert notebooks[0] == "00_toy_world" and len(notebooks) >= 9
    assert {r.notebook for r in runs} == set(notebooks)
    assert all(sum(r.is_default for r in runs if r.notebook == nb) == 1 for nb in notebooks)


def test_lines_parse_into_runs(tmp_path):
    path = _write(tmp_path, "# comment\n\na/01_x  toy  -\n"
                            "a/01_x  smol  model=smol-m  hijack_text='a cat .'  # note\n")
    assert matrix.read_matrix(path) == [
        matrix.Run("a/01_x", "toy"),
        matrix.Run("a/01_x", "smol", (("model", "smol-m"), ("hijack_text", "a cat ."))),
    ]


@pytest.mark.parametrize("text, message", [
    ("a/01_x toy\n", r"matrix.txt:1: expected 'notebook run parameters'"),
    ("a/01_x toy -\na/01_x real model\n", r"matrix.txt:2: parameter 'model' is not NAME=VALUE"),
    ("a/01_x ../up -\n", "must be a plain folder name"),
    ("a/01_x toy -\na/01_x toy model=m\n", r"runs named twice for one notebook: a/01_x \(toy\)"),
    ("a/01_x real model=m\n", r"a/01_x needs exactly one run of its defaults \('-'\), has 0"),
])
def test_bad_matrix_lines_are_refused(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        matrix.read_matrix(_write(tmp_path, text))


MATRIX = [matrix.Run("a/01_x", "toy"), matrix.Run("a/01_x", "real", (("model", "toy-chat"),)),
          matrix.Run("a/01_x", "absent", (("model", "no-such-model"),)),
          matrix.Run("b/01_y", "toy")]


def test_runs_of_missing_models_are_skipped_with_a_message():
    runs, skipped = matrix.plan(MATRIX, ["a/01_x", "b/01_y"])
    assert [(r.notebook, r.name) for r in runs] == [("a/01_x", "toy"), ("a/01_x", "real"),
                                                   ("b/01_y", "toy")]
    assert len(skipped) == 1
    assert skipped[0].startswith("skipped a/01_x on absent: model 'no-such-model' is neither in "
                                 "locus.zoo")


def test_runs_are_chosen_by_name_and_unknown_names_refused():
    runs, skipped = matrix.plan(MATRIX, ["a/01_x", "b/01_y"], names=["toy"])
    assert [r.name for r in runs] == ["toy", "toy"] and skipped == []
    with pytest.raises(ValueError, match="no runs named nope"):
        matrix.plan(MATRIX, ["a/01_x"], names=["nope"])
    with pytest.raises(ValueError, match="not in the model matrix .*: c/01_z"):
        matrix.plan(MATRIX, ["c/01_z"])


def test_a_model_parameter_makes_its_own_run(tmp_path):
    params = ["-p", "model", "/models/llava-1.5-7b-hf/", "-p", "device", "cuda"]
    runs, skipped = matrix.plan(MATRIX, ["a/01_x"], params=params)
    assert runs == [matrix.Run("a/01_x", "llava-1.5-7b-hf",
                               (("model", "/models/llava-1.5-7b-hf/"),))] and skipped == []
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("chat_model: toy-chat-base\nvlm_model: /m/smol-llava\n")
    runs, _ = matrix.plan(MATRIX, ["a/01_x"], params=["-f", str(yaml_file), "-y", "seeds: [0]"])
    assert runs == [matrix.Run("a/01_x", "smol-llava+toy-chat-base",
                               (("vlm_model", "/m/smol-llava"), ("chat_model", "toy-chat-base")))]
    with pytest.raises(ValueError, match="LOCUS_FIGURES_DIR"):
        matrix.plan(MATRIX, ["a/01_x"], params=["-p", "figures_dir", "/tmp/f"])
    with pytest.raises(ValueError, match="give one or the other"):
        matrix.plan(MATRIX, ["a/01_x"], names=["toy"], params=params)
    with pytest.raises(ValueError, match="unexpected papermill option '--x'"):
        matrix.user_parameters(["--x"])


def test_papermill_arguments_keep_each_runs_figures_apart(tmp_path):
    out = tmp_path / "out"
    default = matrix.papermill_args(MATRIX[0], out, ["-p", "device", "cpu"], tmp_path)
    assert default == [str(matrix.NOTEBOOKS / "a/01_x.ipynb"), str(out / "toy/a/01_x.ipynb"),
                       "-p", "device", "cpu"]
    real = matrix.papermill_args(MATRIX[1], out, [], tmp_path)
    assert real[1:] == [str(out / "real/a/01_x.ipynb"), "-p", "model", "toy-chat",
                        "-p", "figures_dir", str(tmp_path / "real")]


def test_notebooks_are_found_in_run_order_and_selected_by_path(tmp_path):
    for name in ("b/02_y", "b/01_x", "a/01_w", "00_world"):
        (tmp_path / f"{name}.ipynb").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.ipynb").write_text("{}")
    found = matrix.find_notebooks(tmp_path)
    assert found == ["00_world", "a/01_w", "b/01_x", "b/02_y"]
    assert matrix.select_notebooks(found, [str(tmp_path / "b")], tmp_path) == ["b/01_x", "b/02_y"]
    assert matrix.select_notebooks(found, [str(tmp_path / "a/01_w.ipynb")], tmp_path) == ["a/01_w"]
    with pytest.raises(ValueError, match="no notebooks matched"):
        matrix.select_notebooks(found, [str(tmp_path / "c")], tmp_path)


def test_a_list_value_reaches_papermill_as_a_yaml_list(tmp_path):
    import yaml

    run = matrix.Run("a/01_x", "real", (("lrs", "[0.0001,0.001]"), ("steps", "12")))
    args = matrix.papermill_args(run, tmp_path / "out", [], tmp_path)
    assert args[2:6] == ["-y", "lrs: [0.0001,0.001]", "-p", "steps"]
    assert yaml.safe_load(args[3]) == {"lrs": [0.0001, 0.001]}
