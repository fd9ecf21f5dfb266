"""Integration: the 3D Slicer flow on a local studies folder, with training.

A real MONAI Label server on a temp studies folder holding a small **synthetic** cohort
(``scripts/make_cohort.py``: Colin27 + AAL, elastically deformed, bias field, contrast change,
noise; cropped around the right caudate and putamen, 2.5 mm slices), driven with
``monailabel.client`` in the order the Slicer plugin uses: info -> next sample -> infer with
clicks -> save label, for three volumes -> train -> infer again. The fourth volume is held out:
the same rough clicks on it must give a better right caudate after one short training round.

The server runs with MONAI Label's authentication on, and the client logs in first as Slicer then
does. The identity provider is ``scripts/oidc_realm.py``, a local realm serving what MONAI Label
reads from Keycloak (public key, token endpoint, RS256 tokens with realm roles); Keycloak itself
cannot run here. The MONAI Label server and the app are the real ones.
"""

from __future__ import annotations

import threading
import time

import local_server
import nibabel as nib
import numpy as np
import oidc_realm
import pytest
import requests
from annotator import corrective_click
from make_cohort import make_cohort, write_cohort
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.spd.training import ClickStyle, simulate_clicks

pytestmark = pytest.mark.server

LABEL, LABEL_VALUE, NEIGHBOUR_VALUE = "right_caudate", 2, 4
MIN_GAIN = 0.05  # held-out Dice must rise by at least this much (measured gain: about 0.2)
ROUND = {"labels": LABEL, "max_epochs": 4, "head_epochs": 20, "max_minutes": 3}  # a short bounded round
TIMEOUT_S = 420


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four synthetic volumes: images in a studies folder, labels kept aside until annotators "save" them."""
    work = tmp_path_factory.mktemp("training_server")
    subjects = make_cohort(4, seed=3, labels=[LABEL, "right_putamen"], crop_margin_mm=(35, 35, 8), slice_mm=2.5)
    write_cohort(subjects, work / "studies", label_dir=work / "labels")
    return work, subjects


@pytest.fixture(scope="module")
def realm():
    realm = oidc_realm.start()
    yield realm
    realm.stop()


@pytest.fixture(scope="module")
def server(cohort, realm):
    work, _ = cohort
    env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.uri}
    running = local_server.start(work, work / "studies", conf={"trained_dir": str(work / "trained")}, env=env,
                                 probe="/auth/")
    yield running
    running.stop()
    print(f"\nserver log: {running.log}")


def client_for(server, work, user: str = "admin", folder: str = "client") -> MONAILabelClient:
    """A client logged in as ``user`` (password from the realm), as the Slicer plugin logs in when the server
    has auth on. It saves results in its own folder: with the default (the temp folder) it would write to
    the same path as the server's result file, which the server deletes after answering."""
    (work / folder).mkdir(exist_ok=True)
    client = MONAILabelClient(server.url, tmpdir=str(work / folder))
    assert client.auth_enabled()
    client.update_auth(client.auth_token(user, oidc_realm.DEFAULT_USERS[user][0]))
    return client


def test_requests_without_a_valid_token_are_refused(server, realm):
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 401
    forged = oidc_realm.start()  # a realm with another key signs the same claims
    try:
        tokens = {"forged": forged.token("admin", oidc_realm.ALL_ROLES),
                  "expired": realm.token("admin", oidc_realm.ALL_ROLES, lifetime_s=-60)}
    finally:
        forged.stop()
    for kind, token in tokens.items():
        response = requests.get(f"{server.url}/info/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert response.status_code == 401, kind


def test_roles_are_enforced(server, cohort):
    work, subjects = cohort
    viewer = client_for(server, work, "viewer")
    assert viewer.info()["models"]["spd_sam"]["type"] == "deepgrow", "a plain user may read /info/"
    label = work / "empty_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(subjects[0].label.shape, np.uint8), np.eye(4)), label)
    with label.open("rb") as handle:
        response = requests.put(f"{server.url}/datastore/label", params={"image": subjects[0].name, "tag": "final"},
                                files={"label": ("label.nii.gz", handle)}, headers=viewer._headers, timeout=60)
    assert response.status_code == 403, "a plain user may not save labels"
    annotator = client_for(server, work, "annotator")
    response = requests.post(f"{server.url}/train/spd_sam", json={}, headers=annotator._headers, timeout=60)
    assert response.status_code == 403, "only admins start training"


def caudate_dice(client: MONAILabelClient, subject, clicks) -> tuple[float, dict]:
    """Dice of the right caudate that ``clicks`` give on ``subject``, and the infer answer."""
    params = {"label": LABEL, "foreground": clicks, "background": [], "slice_axis": 2}
    result_file, result = client.infer("spd_sam", subject.name, params)
    return dice(np.asarray(nib.load(result_file).dataobj) > 0, subject.label == LABEL_VALUE), result


def rough_clicks(subject, seed: int) -> list[list[int]]:
    """One click every 3rd slice along the right caudate, 3 mm drift, 15 % on the putamen."""
    clicks, _ = simulate_clicks(subject.label == LABEL_VALUE, (1.0, 1.0, 2.5), 2, ClickStyle(3, 3.0, 0.15),
                                np.random.default_rng(seed), subject.label == NEIGHBOUR_VALUE)
    return clicks


def test_slicer_flow_next_sample_infer_save_train_infer_again(server, cohort):
    work, subjects = cohort
    client = client_for(server, work)
    info = client.info()
    assert info["models"]["spd_sam"]["type"] == "deepgrow"
    assert info["trainers"]["spd_sam"]["config"]["max_minutes"] <= 15
    assert {"random", "first", "spd_uncertainty"} <= set(info["strategies"])
    held_out = subjects[-1]
    clicks = rough_clicks(held_out, 11)
    before, result = caudate_dice(client, held_out, clicks)
    assert result["model_version"] is None
    assert info["models"]["spd_sam_auto"]["type"] == "segmentation" and info["models"]["spd_sam_auto"]["labels"] == {}
    with pytest.raises(MONAILabelClientException, match="409.*training round"):
        client.infer("spd_sam_auto", held_out.name, {})

    for k, subject in enumerate(subjects[:3]):  # annotate: next sample, clicks, correct and submit
        sample = client.next_sample("first", {})
        assert sample["id"] == subject.name, "'first' proposes the unlabelled volumes in order"
        score, _ = caudate_dice(client, subject, rough_clicks(subject, k))
        assert score > 0.2, f"{subject.name}: the untrained model finds the structure ({score:.3f})"
        client.save_label(subject.name, str(work / "labels" / f"{subject.name}.nii.gz"), tag="final")
    sample = client.next_sample("first", {})
    assert sample["id"] == held_out.name and sample["spd_sam_auto"] == "nothing learned yet", sample
    started = time.monotonic()
    client.train_start("spd_sam", ROUND)
    status = client.train_status()
    while status["status"] in ("SUBMITTED", "RUNNING") and time.monotonic() - started < TIMEOUT_S:
        time.sleep(5)
        status = client.train_status()
    details = "\n".join(status.get("details") or [])
    assert status["status"] == "DONE", f"training ended {status['status']}:\n{details}\n{server.log_tail()}"
    train_s = time.monotonic() - started
    log = server.log.read_text()
    assert "decoder epoch" in log and "published checkpoint" in log, "progress and publication are logged"

    after, result = caudate_dice(client, held_out, clicks)
    print(f"held-out {LABEL} Dice: untrained {before:.3f}, after one round {after:.3f} (training {train_s:.0f} s)")
    assert result["model_version"] == 1, "the infer process picked up the new checkpoint without a restart"
    assert after >= before + MIN_GAIN, (before, after)

    trained = work / "trained"
    assert (trained / "current").read_text().strip() == "v0001.pt"
    assert (trained / "v0001.png").stat().st_size > 1000, "training curve beside the checkpoint"
    stats = client.info()["train_stats"]["spd_sam"]
    assert stats["version"] == 1 and LABEL in stats["val_dice"]
    sample = client.next_sample("first", {})  # Slicer's next sample: its auto segmentation starts in the background
    assert sample["id"] == held_out.name and sample["spd_sam_auto"] == "computing", sample
    check_auto_segmentation(client, work, held_out, after)


def check_auto_segmentation(client: MONAILabelClient, work, held_out, clicked: float) -> None:
    """After the round, ``spd_sam_auto`` segments the learned caudate with no clicks, and finds nothing on a crop of
    the same volume without it."""
    assert client.info()["models"]["spd_sam_auto"]["labels"] == {LABEL: LABEL_VALUE}, "listed without a restart"
    result_file, result = client.infer("spd_sam_auto", held_out.name, {})
    auto = np.asarray(nib.load(result_file).dataobj)
    truth = held_out.label == LABEL_VALUE
    score = dice(auto == LABEL_VALUE, truth)
    found = result["structures"][LABEL]
    print(f"held-out {LABEL}: auto Dice {score:.3f} (confidence {found['confidence']}, {len(found['clicks'])} "
          f"self-clicks) vs clicked {clicked:.3f}; computed ahead in {found['seconds']} s, answered in "
          f"{result['timing']['total']} s")
    assert result["precomputed"], "the proposed next sample was segmented ahead"
    assert set(np.unique(auto)) <= {0, LABEL_VALUE} and result["model_version"] == 1
    assert score >= 0.3, (score, found)
    # the annotator's next click on the caudate corrects the auto result (Slicer sends it to spd_sam)
    point, positive = corrective_click(auto == LABEL_VALUE, truth, (1.0, 1.0, 2.5))
    params = {"label": LABEL, "foreground": [point] if positive else [], "background": [] if positive else [point]}
    result_file, result = client.infer("spd_sam", held_out.name, params)
    corrected = np.asarray(nib.load(result_file).dataobj) > 0
    assert result["interaction"]["mode"] == "correction" and result["interaction"]["clicks"] == 1, result["interaction"]
    assert corrected[tuple(point)] == positive, "the clicked voxel is added (positive) or removed (negative)"
    print(f"a {'positive' if positive else 'negative'} corrective click on the auto result: Dice {score:.3f} -> "
          f"{dice(corrected, truth):.3f}")
    # the same volume cut at the caudate's lateral edge keeps the putamen and loses the caudate
    caudate_i = np.flatnonzero(truth.any(axis=(1, 2)))
    putamen_i = np.flatnonzero((held_out.label == NEIGHBOUR_VALUE).any(axis=(1, 2)))
    keep = slice(caudate_i[-1] + 2, None) if putamen_i.mean() > caudate_i.mean() else slice(0, caudate_i[0] - 1)
    cropped = work / "without_caudate.nii.gz"
    nib.save(nib.Nifti1Image(held_out.image[keep], held_out.affine), cropped)
    _, result = client.infer("spd_sam_auto", "", {"label": LABEL}, file=str(cropped))
    assert result["structures"][LABEL]["voxels"] < 0.01 * truth.sum(), result["structures"]
    assert not result["precomputed"]


def test_annotators_on_one_image_while_a_round_trains_each_get_their_own_result(server, cohort):
    """Three annotators at once on the same image while a training round runs: two segment the right caudate from
    different clicks, one the right putamen. Each answer is the requester's own (its label, its clicks in the
    consensus record, its structure), and the round's process leaves a core to the server (logged)."""
    work, subjects = cohort
    subject = subjects[-1]

    def requests_(seed: int) -> dict[str, tuple]:
        putamen, _ = simulate_clicks(subject.label == NEIGHBOUR_VALUE, (1.0, 1.0, 2.5), 2, ClickStyle(3, 3.0, 0.0),
                                     np.random.default_rng(seed))
        return {"caudate A": (LABEL, LABEL_VALUE, rough_clicks(subject, seed)),
                "caudate B": (LABEL, LABEL_VALUE, rough_clicks(subject, seed + 1)),
                "putamen": ("right_putamen", NEIGHBOUR_VALUE, putamen)}

    answers: dict[str, tuple] = {}

    def annotate(name: str, jobs: dict) -> None:
        label, _, clicks = jobs[name]
        client = client_for(server, work, folder=f"client {name}")
        tic = time.monotonic()
        result_file, result = client.infer("spd_sam", subject.name,
                                           {"label": label, "foreground": clicks, "background": [], "slice_axis": 2})
        answers[name] = (np.asarray(nib.load(result_file).dataobj), result, time.monotonic() - tic)

    for seed in (21, 31):  # the first embeds the structures' slices; the second is the latency without training
        for name in requests_(seed):
            annotate(name, requests_(seed))
    alone = {name: answer[2] for name, answer in answers.items()}
    jobs = requests_(41)
    client = client_for(server, work)
    for labelled in subjects[:3]:  # the round needs final labels (the Slicer flow above saved the same ones)
        client.save_label(labelled.name, str(work / "labels" / f"{labelled.name}.nii.gz"), tag="final")
    rounds = server.log.read_text().count("spd_sam training:")
    client.train_start("spd_sam", ROUND)
    deadline = time.monotonic() + 120
    while server.log.read_text().count("spd_sam training:") == rounds and time.monotonic() < deadline:
        time.sleep(1)
    threads = [threading.Thread(target=annotate, args=(name, jobs)) for name in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    status = client.train_status()
    client.train_stop()
    assert status["status"] == "RUNNING", f"the round was still training while the annotators worked: {status}"
    assert "training process:" in server.log.read_text(), "the round's process leaves a core to the server"
    print("infer latency (s), one at a time without training -> three at once with a round training: "
          + ", ".join(f"{name} {alone[name]:.1f} -> {answers[name][2]:.1f}" for name in jobs))
    for name, (label, value, clicks) in jobs.items():
        mask, result, _ = answers[name]
        assert result["label_names"] == {label: value}
        assert set(np.unique(mask)) <= {0, value}
        sent = {tuple(c) for c in clicks}
        recorded = {tuple(round(v) for v in d["ijk"]) for status in ("kept", "moved", "rejected")
                    for d in result["consensus"][status]}
        assert recorded == sent, f"{name}: the consensus record holds another request's clicks"
        own, other = (subject.label == value), (subject.label == (NEIGHBOUR_VALUE if value == LABEL_VALUE else LABEL_VALUE))
        assert dice(mask > 0, own) > max(0.3, dice(mask > 0, other)), name


def test_a_stopped_round_leaves_the_served_model_intact(server, cohort):
    work, subjects = cohort
    client = client_for(server, work)
    published = (work / "trained" / "current").read_text() if (work / "trained" / "current").exists() else None
    rounds = server.log.read_text().count("spd_sam training:")
    client.train_start("spd_sam", ROUND)
    deadline = time.monotonic() + 90
    while server.log.read_text().count("spd_sam training:") == rounds and time.monotonic() < deadline:
        time.sleep(1)
    assert client.train_stop()["status"] == "STOPPED"
    assert client.train_status()["status"] == "STOPPED"
    current = work / "trained" / "current"
    assert (current.read_text() if current.exists() else None) == published
    held_out = subjects[-1]
    _, result = caudate_dice(client, held_out, rough_clicks(held_out, 0))
    assert result["model_version"] == (1 if published else None)
