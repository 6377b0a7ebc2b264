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
            assert labels["prior_2"] == list(seq.states[-3][ex.box])
            assert set(labels["mentioned"]) >= {o for b in seq.initial for o in b}
