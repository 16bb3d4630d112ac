import math

import pytest
import torch

from analysis.soft_moe import soft_moe_stats
from routelab import FFNExperts
from routelab.soft_moe import SoftMoE


def test_slot_mass_is_balanced_by_construction_and_combine_mass_sums_to_t():
    torch.manual_seed(0)
    layer = SoftMoE(6, 3, FFNExperts(3, 6, 8), slots_per_expert=2)
    out = layer(torch.randn(4, 5, 6))
    stats = soft_moe_stats(out)
    torch.testing.assert_close(stats.slot_mass, torch.full((3,), 8.0, dtype=torch.float64))
    assert float(stats.combine_mass.sum()) == pytest.approx(20.0)
    assert stats.expert_rows_per_token == pytest.approx(3 * 2 / 5)
    assert 0.0 < stats.dispatch_entropy <= 1.0 and 0.0 < stats.combine_entropy <= 1.0


def test_entropies_and_label_table_match_a_count_by_hand():
    # one group of two tokens, one expert with two slots: slot 0 takes token 0, slot 1 mixes
    dispatch = torch.tensor([[[[1.0, 0.5]], [[0.0, 0.5]]]])  # [G=1, S=2, E=1, p=2]
    combine = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]]])

    class Output:
        pass

    out = Output()
    out.dispatch, out.combine = dispatch, combine
    stats = soft_moe_stats(out, labels=torch.tensor([0, 1]))
    assert stats.dispatch_entropy == pytest.approx((0.0 + 1.0) / 2)  # H/log 2 per slot
    assert stats.combine_entropy == pytest.approx((1.0 + 0.0) / 2)
    assert stats.table.tolist() == [[1.5, 0.5]]
    assert stats.mutual_information == 0.0  # one expert: no information
    assert math.isclose(stats.cv_combine_mass, 0.0)


def test_specialised_slots_carry_label_information():
    dispatch = torch.zeros(1, 4, 2, 1)
    dispatch[0, :2, 0, 0] = 0.5  # expert 0's slot averages the two label-0 tokens
    dispatch[0, 2:, 1, 0] = 0.5  # expert 1's slot the two label-1 tokens
    out = type("Output", (), {"dispatch": dispatch, "combine": torch.full((1, 4, 2, 1), 0.5)})
    stats = soft_moe_stats(out, labels=torch.tensor([0, 0, 1, 1]))
    assert stats.mutual_information == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="labels"):
        soft_moe_stats(out, labels=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="SoftMoEOutput"):
        soft_moe_stats(object())


def test_padded_positions_of_a_last_group_are_not_tokens():
    torch.manual_seed(0)
    layer = SoftMoE(4, 2, FFNExperts(2, 4, 8), group_size=4)
    stats = soft_moe_stats(layer(torch.randn(6, 4)), labels=torch.tensor([0, 1, 0, 1, 0, 1]))
    assert float(stats.combine_mass.sum()) == pytest.approx(6.0)
    assert stats.expert_rows_per_token == pytest.approx(2 * 2 / 6)  # 2 groups x 2 slots
    assert float(stats.table.sum()) == pytest.approx(4.0)  # each of the 4 slots: mass 1
