"""States replayed from a description, and the probe labels of a query, against the generator's own."""

from boxprobe.data.labels import query_labels, states_from_context
from boxprobe.data.prompts import build_queries, load_template
from boxprobe.data.task import TaskConfig, generate_sequences, render_description, sequence_examples

DATA = TaskConfig(num_boxes=3, num_samples=4, num_operations=4, seed=1)


def test_states_and_labels_match_generator():
    for cfg in (DATA, TaskConfig(num_samples=4, num_operations=8, seed=7, alt_forms=True, move_contents=True)):
        for seq in generate_sequences(cfg):
            assert states_from_context(render_description(seq, len(seq.operations), cfg)) == list(seq.states)
            ex = sequence_examples(seq, cfg)[-1]
            (q,) = build_queries([ex], load_template("toy"))
            labels = query_labels(q)
            assert labels["query_box"] == ex.box and labels["num_operations"] == len(seq.operations)
            assert labels["gold"] == list(seq.states[-1][ex.box])
            assert labels["state"] == [list(b) for b in seq.states[-1]]
            assert labels["global_prior_2"] == list(seq.states[-3][ex.box])
            assert labels["box_ops"] == ex.numops  # every operation that names a box changes it
            assert set(labels["mentioned"]) >= {o for b in seq.initial for o in b}


# Worked by hand. Box 0: apple -> (op0: put cup) apple,cup -> (op2: remove apple) cup.
# Box 1 is named only by op1 (move bell in). Op3 touches Box 2 only.
CONTEXT = ("Box 0 contains the apple, Box 1 contains nothing, Box 2 contains the bell and the drum. "
           "Put the cup into Box 0. Move the bell from Box 2 to Box 1. Remove the apple from Box 0. "
           "Remove the drum from Box 2.")


def _labels(box: int, gold: list[str]) -> dict:
    from boxprobe.data.task import Example
    answer = " and ".join(f"the {o}" for o in gold) or "nothing"
    ex = Example(sentence=f"{CONTEXT} Box {box} contains {answer}.",
                 sentence_masked=f"{CONTEXT} Box {box} contains <extra_id_0> .",
                 masked_content=f"<extra_id_0> {answer}", sample_id=0, numops=0, num_operations=4, box=box)
    (q,) = build_queries([ex], load_template("toy"))
    return query_labels(q)


def test_prior_k_backtracks_over_the_queried_boxs_operations():
    box0 = _labels(0, ["cup"])
    assert box0["gold"] == ["cup"] and box0["box_ops"] == 2 and box0["initial"] == ["apple"]
    # Local: before "Remove the apple" (op2) Box 0 held apple and cup; before "Put the cup" (op0), the apple.
    assert box0["prior_1"] == ["apple", "cup"] and box0["prior_2"] == ["apple"] and box0["prior_3"] is None
    # Global: one operation ago (before op3, which is about Box 2) Box 0 already held only the cup,
    # so the global prior_1 equals the current contents where the local one does not.
    assert box0["global_prior_1"] == ["cup"] and box0["global_prior_2"] == ["apple", "cup"]
    box1 = _labels(1, ["bell"])
    assert box1["box_ops"] == 1 and box1["prior_1"] == [] and box1["prior_2"] is None  # a move's destination counts
    box2 = _labels(2, [])
    assert box2["box_ops"] == 2 and box2["prior_1"] == ["drum"] and box2["prior_2"] == ["bell", "drum"]  # and its source
    assert box2["initial_state"] == [["apple"], [], ["bell", "drum"]] and box2["state"] == [["cup"], ["bell"], []]
    assert box2["mentioned"] == ["apple", "bell", "drum", "cup"]
