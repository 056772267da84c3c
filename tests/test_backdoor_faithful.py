"""The paper's objective on a backdoor (``FaithfulBackdoorSearch``): the circuit starts as the
whole model and the mask the search ended on is kept, so it can prune; its search is cached
under its own name beside the code objective's; bad ``keep`` values are refused."""

import pytest
import torch

from locus import data, models
from locus.safeseek import backdoor, circuits


def test_the_paper_objective_prunes_and_is_cached(tiny_llama_dir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    samples = data.make_chat_samples(4, seed=12, aligned=False)
    cfg = backdoor.InjectionConfig(kind="fixed", n_clean=4, n_poison=4, steps=1, batch=4)
    entry = backdoor.backdoor_entry(str(tiny_llama_dir), samples, cfg, root=tmp_path,
                                    progress=False)
    model, tok = models.load_checkpoint(entry)
    spec = backdoor.FaithfulBackdoorSearch(sparsity=0.05, init=0.2, lr=0.05, n_train=4,
                                           n_val=2, batch_size=2, epochs=6, patience=None)
    found, carrier = backdoor.backdoor_circuit(entry, model, tok, samples, "fixed", spec,
                                               root=tmp_path, progress=False)
    shape = circuits.UnitShape.of(model)
    assert carrier is None and found.sparsity < 1  # pruned from the whole model
    assert len(found.heads) + len(found.neurons) < shape.num_layers * (
        shape.num_heads + shape.intermediate_size)
    assert list((tmp_path / "safeseek").glob(f"{entry.name}-faithful-sum0.05-seed0"))

    def no_search(*args, **kwargs):
        raise AssertionError("the cached circuit should be read, not searched again")

    monkeypatch.setattr(backdoor, "find_faithful_backdoor_circuit", no_search)
    assert backdoor.backdoor_circuit(entry, model, tok, samples, "fixed", spec, root=tmp_path,
                                     progress=False) == (found, None)


def test_keep_last_returns_the_final_mask_and_bad_keep_is_refused(tiny_llama_dir):
    model, tok = models.load_checkpoint(tiny_llama_dir)
    samples = data.make_chat_samples(3, seed=5, aligned=False)
    spec = backdoor.FaithfulBackdoorSearch(sparsity=0.05, init=0.2, lr=0.05, n_train=4,
                                           n_val=2, batch_size=2, epochs=5, patience=None)
    result = backdoor.find_faithful_backdoor_circuit(model, tok, samples, "fixed", spec,
                                                     progress=False)
    last = result.history[-1]
    assert result.best_epoch == last["epoch"] == 4
    assert (len(result.circuit.heads), len(result.circuit.neurons)) == (last["heads"],
                                                                       last["neurons"])
    with pytest.raises(ValueError, match="keep"):
        circuits.search_circuit(model, circuits.FaithfulnessObjective(
            circuits.UnitShape.of(model)), [{}], [{}], circuits.SearchConfig(keep="first"))
