"""Version-1 meta-states (as the engine before the unified search wrote them, stored in
tests/worker/engine/data/meta_state_v1.json with what that engine went on to reach) resume with this one.

Unlike test_meta_equivalence.py this needs no copy of the old engine, so it stays when that goes.
"""

import json
import pathlib

import pytest

from tests.helpers.tasks import synthetic_task
from worker.engine import MetaConfig, best_settings, run_meta
from worker.engine.meta import MetaState

FIXTURE = json.loads((pathlib.Path(__file__).parent / "data" / "meta_state_v1.json").read_text())


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["case"] for c in FIXTURE["cases"]])
def test_a_stored_version_1_state_resumes_to_what_the_old_engine_reached(case):
    tasks = [synthetic_task(seed=s, n=64, steps=16) for s in range(2)]
    config = MetaConfig(**case["config"])
    checkpoint = case["checkpoint"]
    assert checkpoint["version"] == 1
    # read as it is: the search's position, step and best point carry over
    typed = MetaState.from_json(checkpoint)
    assert typed.iteration == case["split"] and typed.constant.theta == checkpoint["theta"]
    assert typed.constant.step == checkpoint["step"]
    assert typed.constant.screen_next == checkpoint.get("screen_next", False)
    assert typed.constant.best.meta_loss == checkpoint["best"]["meta_loss"]
    records = []
    state = run_meta(tasks, config, checkpoint, config.iterations, on_iteration=records.append)
    assert checkpoint["version"] == 1 and state["version"] == 2  # the argument is left as it was
    assert [r["iteration"] for r in records] == list(range(case["split"] + 1, config.iterations + 1))
    assert [r["meta_loss"] for r in records] == pytest.approx(case["expected_meta_losses"], rel=1e-9)
    got, want = best_settings(state), case["expected_best_settings"]
    assert got.keys() == want.keys()
    for key in ("lr", "momentum", "meta_loss", "meta_loss_groups"):
        if key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
    for g, w in zip(got.get("param_groups", []), want.get("param_groups", []), strict=True):
        assert g["params"] == w["params"]
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9) and g["momentum"] == pytest.approx(w["momentum"], rel=1e-9)
