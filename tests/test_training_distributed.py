"""DDP on the CPU: two gloo processes share the work and end every step with the same weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from lib.spd.training import Rank, exit_rank

STEPS, LR = 3, 0.1


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def _rank_main(rank: int, world: int, work: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{work}/rendezvous", rank=rank, world_size=world)
    try:
        ranks = Rank.current()
        torch.manual_seed(100 + rank)  # different initial weights: DDP must start every rank from rank 0's
        model = torch.nn.Linear(4, 1) if rank else _model()
        net = ranks.wrap(model)
        optimiser = torch.optim.SGD(model.parameters(), lr=LR)
        x, y = _data()
        rows = ranks.shard(list(range(len(x))))
        for _ in range(STEPS):
            loss = ((net(x[rows]) - y[rows]) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        weights = ranks.gather([p.detach().tolist() for p in model.parameters()])
        answer = {"rows": ranks.gather(rows), "weights": weights, "agree_all": ranks.all_agree(True),
                  "agree_one_false": ranks.all_agree(rank == 0), "world": ranks.world}
        if rank == 0:
            with open(f"{work}/answer.json", "w") as handle:
                json.dump(answer, handle)
        dist.barrier()  # no rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()
    exit_rank()


def test_a_single_process_is_rank_0_of_1():
    ranks = Rank.current()
    assert (ranks.rank, ranks.world, ranks.distributed, ranks.main) == (0, 1, False, True)
    assert ranks.shard([1, 2, 3]) == [1, 2, 3] and ranks.gather("x") == ["x"] and ranks.all_agree(False) is False
    module = torch.nn.Linear(2, 2)
    assert ranks.wrap(module) is module


def test_shards_are_equally_long_and_cover_everything():
    shards = [Rank(r, 3).shard(list(range(7))) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(set(sum(shards, []))) == list(range(7))


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_gloo_processes_train_like_one_process_on_the_whole_batch(tmp_path):
    torch.multiprocessing.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    answer = json.loads((tmp_path / "answer.json").read_text())
    assert answer["world"] == 2 and answer["agree_all"] is True and answer["agree_one_false"] is False
    assert sorted(answer["rows"][0] + answer["rows"][1]) == list(range(8)) and not set(answer["rows"][0]) & set(answer["rows"][1])
    assert answer["weights"][0] == answer["weights"][1], "every rank holds the same weights"

    # DDP averages the ranks' gradients: with equal shards that is the gradient of the whole batch.
    model = _model()
    optimiser = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    for _ in range(STEPS):
        loss = ((model(x) - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    expected = [p.detach() for p in model.parameters()]
    for got, want in zip(answer["weights"][0], expected):
        assert torch.allclose(torch.tensor(got), want, atol=1e-5)
