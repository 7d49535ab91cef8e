"""The checked-results policy (``peer.swarm.checks``): which route is odd, when a difference is excused, who is
blamed, and what the checker does with a live route function (here: plain coroutines returning routes)."""

import asyncio

import pytest

from peer.swarm.checks import ResultChecker, Route, agree, comparable, excused, odd_route, suspects


def route(loss, *endpoints, epochs=(3, 5)):
    return Route(loss, tuple(endpoints), tuple(epochs))


def test_agreement_is_relative_and_never_for_nan():
    assert agree(route(7.0), route(7.1), 0.02)
    assert not agree(route(7.0), route(7.3), 0.02)
    assert agree(route(0.2), route(0.21), 0.02)  # near 0: relative to 1 nat, not to the loss
    assert not agree(route(float("nan")), route(float("nan")), 0.02)


def test_routes_compare_only_at_the_same_known_epochs():
    assert comparable(route(1, epochs=(3, 5)), route(2, epochs=(3, 5)))
    assert not comparable(route(1, epochs=(3, 5)), route(2, epochs=(3, 6)))
    assert not comparable(route(1, epochs=(-1, 5)), route(2, epochs=(-1, 5)))
    assert not comparable(route(1, epochs=(3,)), route(2, epochs=(3, 5)))


def test_the_odd_route_is_the_one_two_comparable_others_disagree_with():
    liar, a, b = route(1.0, "f:1"), route(7.0, "a:1", "s:1"), route(7.02, "b:1", "s:1")
    assert odd_route((liar, a, b), 0.02) == (liar, a)
    assert odd_route((a, liar, b), 0.02) == (liar, a)
    third = route(4.0, "c:1", "s:1")
    assert odd_route((a, b, third), 0.02) == (third, a)
    assert odd_route((a, route(6.0, "b:1", "s:1"), third), 0.02) is None  # no two agree
    # the two that agree must have run at the same epochs
    assert odd_route((liar, a, route(7.02, "b:1", epochs=(4, 5))), 0.02) is None


def test_an_update_in_between_is_excused_but_not_an_unknown_or_missing_epoch():
    reference = route(7.0, epochs=(3, 5))
    assert excused(route(7.5, epochs=(2, 5)), reference)
    assert not excused(route(7.5, epochs=(3, 5)), reference)
    assert not excused(route(7.5, epochs=(-1, 5)), reference)
    assert not excused(route(1.0, epochs=(0,)), reference)  # a stage that answers for the whole route


def test_only_addresses_on_no_agreeing_route_are_blamed():
    odd = route(1.0, "f:1", "s:1")
    assert suspects(odd, [route(7, "a:1", "s:1"), route(7, "b:1", "s:1")]) == {"f:1"}


def run_check(checker, primary, answers):
    """Run one check whose second and third routes are ``answers``; returns (verdict, the avoid sets asked)."""
    asked = []

    async def again(avoid):
        asked.append(avoid)
        return answers[len(asked) - 1]

    return asyncio.run(checker.check(primary, again)), asked


def test_a_liar_is_caught_and_avoided_from_then_on():
    checker = ResultChecker(1.0, 0.02)
    liar = route(1.0, "f:1", epochs=(0,))  # answers at once for the whole route
    verdict, asked = run_check(checker, liar, [route(7.0, "a:1", "s:1"), route(7.01, "b:1", "s:1")])
    assert verdict == "caught" and list(checker.distrusted) == ["f:1"]
    assert asked == [frozenset({"f:1"}), frozenset({"f:1", "a:1", "s:1"})]  # the distrusted ones go in every hop
    assert checker.avoid == frozenset({"f:1"})
    verdict, asked = run_check(checker, route(7.0, "a:1", "s:1"), [route(7.0, "b:1", "s:1")])
    assert verdict == "agreed" and asked == [frozenset({"a:1", "s:1"})]
    assert checker.counters == {"checks": 2, "agreed": 1, "inconclusive": 0, "mismatch": 0, "caught": 1}


@pytest.mark.parametrize("answers, verdict", [
    ([route(7.0, "b:1", "s:1")], "agreed"),
    ([route(6.5, "b:1", "s:1", epochs=(4, 5)), route(6.5, "c:1", "s:1", epochs=(4, 5))], "inconclusive"),  # a step
    ([route(6.0, "b:1", "s:1"), route(5.0, "c:1", "s:1")], "mismatch"),
    ([None], "inconclusive"),
])
def test_honest_differences_blame_nobody(answers, verdict):
    checker = ResultChecker(1.0, 0.02)
    got, _ = run_check(checker, route(7.0, "a:1", "s:1"), answers)
    assert got == verdict and checker.counters[verdict] == 1
    assert not checker.distrusted


def test_the_fraction_is_drawn_from_a_seeded_generator():
    first = ResultChecker(0.1, 0.02, seed=4)
    second = ResultChecker(0.1, 0.02, seed=4)
    assert [first.due() for _ in range(500)] == [second.due() for _ in range(500)]
    checker = ResultChecker(0.1, 0.02, seed=5)
    assert 60 < sum(checker.due() for _ in range(1000)) < 140
    assert not any(ResultChecker(0.0, 0.02).due() for _ in range(100))
