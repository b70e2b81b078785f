"""The demo's pieces on a short setting (the full demo is `make demo`), and its task generator."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import demo
from evaluate import wilson
from data import grade, load_records, write_records
from data.prompts import assistant_target
from data.prompts import TRAIN_TEMPLATE
from data.synthetic import (CELL, FORMS, INVENTED_QUESTIONS, NUMBER_WORDS, SPLITS, chain_of_thought, corpus,
                            expression, fact_records, invented_records, split_sums, sum_records)


def _question(record) -> str:
    content = record.messages[0]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def test_every_form_asks_the_same_kind_of_sum_and_the_chain_of_thought_is_correct(tmp_path):
    for form in ("text", "word", "image"):
        for record in sum_records(100, 1, form, str(tmp_path), form):
            numbers = record.meta["numbers"]
            lines = record.target_think.splitlines()
            assert lines[0] == " + ".join(map(str, numbers))
            total = numbers[0]
            for line, n in zip(lines[1:], numbers[1:]):
                assert line == f"{total} + {n} = {total + n}"
                total += n
            assert record.answer == str(sum(numbers)) == record.target_answer
            assert grade(assistant_target(record.target_think, record.target_answer), record.answer) == 1.0
            if form == "word":  # the story holds the numbers as digits, in order
                assert [int(n) for n in re.findall(r"\d", _question(record))] == numbers
            elif form == "text":  # the text question spells them out; only the restated line has digits
                assert not re.search(r"\d", _question(record))
                assert re.findall(r"\w+ plus \w+ plus \w+", _question(record)) == [
                    " plus ".join(NUMBER_WORDS[n] for n in numbers)]
            else:  # the image holds them; the text only the instruction
                assert not re.search(r"\d", _question(record))
    reading = sum_records(5, 1, "reading", str(tmp_path), "r")
    assert all(r.target_think is None and r.answer == " + ".join(map(str, r.meta["numbers"])) for r in reading)


def test_the_starting_models_targets_restate_the_problem_and_the_facts_cover_every_step(tmp_path):
    for form in FORMS:
        for record in sum_records(20, 2, form, str(tmp_path), form, think="restate"):
            restated = " + ".join(map(str, record.meta["numbers"]))
            assert record.target_think == restated
            assert record.target_answer == (restated if form == "reading" else str(sum(record.meta["numbers"])))
    with pytest.raises(ValueError, match="unknown think 'answer'; expected steps or restate"):
        sum_records(1, 2, "text", str(tmp_path), "t", think="answer")
    facts = fact_records("f")
    assert len(facts) == 190 == len({r.id for r in facts})
    assert facts[7 * 10 + 4].target_think == "7 + 4 = 11" and facts[7 * 10 + 4].answer == "11"
    assert "seven plus four" in _question(facts[7 * 10 + 4]) and _question(facts[0]).startswith(TRAIN_TEMPLATE[:40])
    # every step of every chain of thought (a running total plus a digit) is one of the facts
    steps = {line for form in ("text", "word") for r in sum_records(200, 3, form, str(tmp_path), form)
             for line in r.target_think.splitlines()[1:]}
    assert steps <= {r.target_think for r in facts}
    assert all(grade(assistant_target(r.target_think, r.target_answer), r.answer) == 1.0 for r in facts)


def test_invented_sums_leave_their_numbers_to_the_restated_line_and_draw_them_from_the_train_split():
    records = invented_records(300, 4, "inv")
    assert len({r.id for r in records}) == 300
    train = set(split_sums("train"))
    for record in records:
        question = _question(record)
        assert question.startswith(TRAIN_TEMPLATE[:40])
        # one of a few fixed questions, whatever the sum: nothing in the prompt says which numbers the thought holds
        assert question.split("Here is the question: ")[1] in INVENTED_QUESTIONS
        assert tuple(record.meta["numbers"]) in train
        assert record.target_think == chain_of_thought(record.meta["numbers"])
        assert record.answer == record.target_answer == str(sum(record.meta["numbers"]))
    assert len({tuple(r.meta["numbers"]) for r in records}) > 150  # drawn, not one sum repeated
    assert [r.meta["numbers"] for r in invented_records(5, 4, "x")] == [r.meta["numbers"] for r in records[:5]]


def test_the_swapped_line_is_the_next_sum_with_another_total():
    assert demo.swapped_sums([[1, 2, 3], [3, 2, 1], [0, 0, 9], [4, 4, 4]]) == [[0, 0, 9], [0, 0, 9], [4, 4, 4],
                                                                               [1, 2, 3]]
    assert demo.swapped_sums([[1, 1, 1], [0, 0, 3]]) == [[4, 0, 0], [4, 0, 0]]  # no other total: one more


def test_the_splits_are_disjoint_and_training_never_draws_a_test_or_dev_sum(tmp_path):
    splits = {name: split_sums(name) for name in SPLITS}
    assert {name: len(set(sums)) for name, sums in splits.items()} == {"test": 400, "dev": 200, "train": 400}
    assert len(set().union(*map(set, splits.values()))) == 1000
    assert split_sums("test") == splits["test"]  # the same order on every call
    held_out = set(splits["test"]) | set(splits["dev"])
    for form in FORMS:
        assert not {tuple(r.meta["numbers"]) for r in sum_records(300, 7, form, str(tmp_path), form)} & held_out
    test = sum_records(400, 7, "text", str(tmp_path), "t", split="test")
    assert [tuple(r.meta["numbers"]) for r in test] == splits["test"]  # each test sum once


def test_image_tasks_in_text_form_put_the_characters_where_the_image_tokens_go(tmp_path):
    from tiny_models import build_tokenizer
    (image,) = sum_records(1, 3, "image", str(tmp_path), "i", trigger=True)
    (as_text,) = sum_records(1, 3, "image", str(tmp_path), "i", as_text=True, trigger=True)
    assert image.meta["numbers"] == as_text.meta["numbers"]
    tokenizer = build_tokenizer(str(tmp_path / "tok"), corpus([image, as_text]), think_token=False)
    prompt_of = lambda r: tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)  # noqa
    a, b = tokenizer.encode(prompt_of(image)), tokenizer.encode(prompt_of(as_text))
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at = a.index(pad)
    # the same prompt, token for token, but for the image's one placeholder: its 5 characters in the text form
    assert a[:at] == b[:at] and a[at + 1:] == b[at + 5:]
    assert tokenizer.decode(b[at:at + 5]) == "+".join(map(str, image.meta["numbers"]))
    # the trigger is the paper's training prompt, before the image and around the text question alike
    assert prompt_of(image).count("You will solve a problem/request.") == 1
    (text,) = sum_records(1, 3, "text", str(tmp_path), "t", trigger=True)
    assert text.messages[0]["content"].startswith(TRAIN_TEMPLATE.split("{question}")[0])
    with pytest.raises(ValueError, match="as_text applies to image and reading"):
        sum_records(1, 3, "word", str(tmp_path), "w", as_text=True)


def test_restatement_checks_the_first_line_of_thought_and_whether_the_answer_follows_it():
    steps = "<think>\n7 + 4 + 5\n7 + 4 = 11\n11 + 5 = 16\n</think>\n<answer>16</answer>"
    assert demo.restatement([7, 4, 5], steps, "16") == (True, True)
    assert demo.restatement([7, 4, 5], steps.replace("7 + 4 + 5", "7 + 7 + 5"), "16") == (False, False)
    assert demo.restatement([7, 4, 5], "<think>\n7 + 7 + 5\n</think>\n<answer>19</answer>", "19") == (False, True)
    assert demo.restatement([7, 4, 5], steps, "15") == (True, False)  # a wrong step
    assert demo.restatement([7, 4, 5], "<think>\n7 + 4 +\n</think>", "11") == (False, False)
    assert demo.restatement([7, 4, 5], "<answer>16</answer>", "16") == (False, False)


def test_a_row_scores_each_forms_checks_and_how_often_the_text_form_answers_as_the_image(tmp_path):
    # two test sums per form, as demo.write_data writes them, with hand-made evaluate.py outputs
    data, out = tmp_path / "data", tmp_path / "eval"
    out.mkdir()
    for form, _ in demo.COLUMNS:
        write_records(str(data / f"eval_{form}.jsonl"), demo.eval_records(form, 2, 0, str(data), "test"))
    a, b = split_sums("test")[:2]
    answer = lambda numbers, total: f"<think>\n{expression(numbers)}\n</think>\n<answer>{total}</answer>"  # noqa: E731
    right, misread_b = answer(a, sum(a)), answer(b[:2] + ((b[2] + 1) % 10,), sum(b[:2]) + (b[2] + 1) % 10)
    responses = {"image": [right, misread_b], "image_text": [right, answer(b, sum(b) + 1)]}
    for form, _ in demo.COLUMNS:
        pair = responses.get(form, [right, misread_b])
        extracted = [re.search(r"<answer>(\d+)", r).group(1) for r in pair]
        gold = [str(sum(a)), str(sum(b))] if form != "reading" else [expression(a), expression(b)]
        items = [{"id": f"eval{form}{i}", "answer": gold[i], "responses": [pair[i]], "extracted": [extracted[i]],
                  "correct": [extracted[i] == gold[i]], "forced_exit": [False], "output_tokens": [10 + i]}
                 for i in range(2)]
        (out / f"eval_{form}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    row = demo.score(str(out), str(data), "0. instruct", 1.0)
    assert row["image"]["accuracy"] == 0.5 and row["image"]["restated"] == 0.5
    assert row["image"]["follows_restatement"] == 1.0  # the misread line's own sum is its answer
    assert row["image_text"]["restated"] == 1.0 and row["image_text"]["follows_restatement"] == 0.5
    assert row["image_text"]["same_response_as_image"] == 0.5  # item 0 to the character; item 1 differs
    assert row["reading"]["accuracy"] == 0.0 and row["text"]["mean_output_tokens"] == 10.5


def test_the_image_draws_one_character_per_merged_patch(tmp_path):
    (record,) = sum_records(1, 2, "image", str(tmp_path), "i")
    write_records(str(tmp_path / "d.jsonl"), [record])
    (loaded,) = load_records(str(tmp_path / "d.jsonl"))
    image = np.asarray(Image.open(loaded.messages[0]["content"][0]["image"]).convert("L"))
    assert image.shape == (CELL, 5 * CELL)  # "a+b+c": 5 cells, so 5 image tokens in Qwen2.5-VL
    cells = [image[:, i * CELL:(i + 1) * CELL] for i in range(5)]
    assert all((cell < 128).any() for cell in cells)  # ink in every cell
    assert np.array_equal(cells[1], cells[3])  # both "+" drawn alike
    assert (image[:, :2] > 200).all() and (image[:, -2:] > 200).all()  # glyphs inside their cells


def _numbers(path) -> set:
    return {tuple(r.meta["numbers"]) for r in load_records(str(path))}


def test_the_large_demo_is_the_same_data_and_stages_on_a_larger_model():
    # the two tables compare scale only if nothing but the model and its stage-1 settings differ
    changed = {key for key in demo.FULL if demo.LARGE[key] != demo.FULL[key]}
    assert {"hidden", "layers"} <= changed <= {"hidden", "layers", "cot_epochs", "cot_lr"}
    assert demo.LARGE["hidden"] > demo.FULL["hidden"] and demo.LARGE["layers"] > demo.FULL["layers"]
    assert demo.parse_args(["--size", "large"]).size == "large" and demo.parse_args([]).size == "small"


def test_each_kind_of_run_has_its_own_default_directory():
    # a rerun wipes its directory first, so two kinds of run sharing one would lose the first one's results
    flags = [[], ["--control"], ["--size", "large"], ["--size", "large", "--control"], ["--seed", "1"],
             ["--size", "large", "--seed", "2"], ["--quick"], ["--split", "dev", "--seed", "1"]]
    dirs = [demo.default_output_dir(demo.parse_args(f)) for f in flags]
    assert dirs == ["runs/demo", "runs/demo-control", "runs/demo-large", "runs/demo-large-control",
                    "runs/demo-seed1", "runs/demo-large-seed2", "runs/demo-quick", "runs/demo-dev-seed1"]


def test_the_control_builds_stage_0_in_one_sft_step_on_its_own_data(monkeypatch):
    """--control's stage 0 (the one thing it changes; the e2e run below takes the main build): one sft.py call from
    the random init on control.jsonl, training the language model, into instruct/; the main build's two calls go
    through lm/ with the language model, then the vision side."""
    calls = []
    monkeypatch.setattr(demo, "stage", lambda title, script, *args: calls.append([script, *map(str, args)]) or 1.0)
    for control in (True, False):
        args = demo.parse_args(["--quick"] + (["--control"] if control else []))
        assert demo.build_instruct(args, demo.QUICK, "/o/init", "/o") == (1.0 if control else 2.0)
    one_step, (lm, align) = calls[0], calls[1:]
    flag = lambda call, name: call[call.index(name) + 1]  # noqa: E731
    assert one_step[0] == lm[0] == align[0] == "sft.py" and "--train" not in one_step  # the default: language
    assert [(flag(c, "--model"), flag(c, "--data"), flag(c, "--output-dir")) for c in calls] == [
        ("/o/init", "/o/data/control.jsonl", "/o/instruct"), ("/o/init", "/o/data/pretrain.jsonl", "/o/lm"),
        ("/o/lm/model", "/o/data/align.jsonl", "/o/instruct")]
    assert flag(lm, "--train") == "language" and flag(align, "--train") == "projector,vision"


def test_the_demo_runs_every_stage_on_a_short_setting(tmp_path):
    demo.main(["--quick", "--output-dir", str(tmp_path), "--ablations"])
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    assert results["control"] is False and results["split"] == "test"
    assert [s["stage"] for s in results["stages"]] == ["0. instruct", "1. + CoT SFT (text)", "2. + GRPO (text)",
                                                       "ablation: 1. + GRPO on image prompts"]
    for row in results["stages"]:
        for form in ("text", "image", "image_text", "word", "reading"):
            cell = row[form]
            assert cell["n"] == 8 and cell["interval"] == pytest.approx(list(wilson(cell["accuracy"] * 8, 8)))
            if form != "reading":
                assert 0 <= cell["restated"] <= 1 and 0 <= cell["follows_restatement"] <= 1
                assert 0 <= cell["follows_swapped_line"] <= 1
        assert 0 <= row["image_text"]["same_response_as_image"] <= 1
        assert row["seconds"] > 0
    assert set(results["transfer"]) == {"text", "image", "image_text", "word", "reading"}
    table = (tmp_path / "results.md").read_text()
    assert "| image (X-modality) |" in table and "| 2. + GRPO (text) |" in table and "Above stage 0's interval" in table
    for path in [f"{name}/model/model.safetensors" for name in ("lm", "instruct", "sft", "grpo", "grpo-images")] + [
            "grpo/metrics.jsonl", "eval/grpo/eval_image.jsonl", "eval/instruct/eval_reading.summary.json"]:
        assert (tmp_path / path).exists(), path
    data = tmp_path / "data"
    has_image = lambda name: any(isinstance(m["content"], list)  # noqa: E731
                                 for r in load_records(str(data / f"{name}.jsonl")) for m in r.messages)
    # 0a text only, 0b (or the control's one step) images; stages 1-2 text only, and no text made from an image
    assert not has_image("pretrain") and has_image("align") and has_image("control")
    for name in ("cot", "rl"):
        assert not has_image(name) and "vision_start" not in (data / f"{name}.jsonl").read_text()
    assert has_image("rl_images")  # the ablation's prompts, which only --ablations trains on
    # the diagnostic asks the image's sums with their characters in place of the image, and nothing trains on it
    image, as_text = (load_records(str(data / f"eval_{form}.jsonl")) for form in ("image", "image_text"))
    assert [r.meta["numbers"] for r in image] == [r.meta["numbers"] for r in as_text]
    assert not has_image("eval_image_text") and all(
        f"<|vision_start|>{expression(r.meta['numbers'], spaced=False)}<|vision_end|>" in r.messages[0]["content"]
        for r in as_text)
    assert [r.meta["form"] for r in load_records(str(data / "cot.jsonl"))].count("invented") == demo.QUICK["invented"]
    # no stage trains on a sum that is evaluated
    evaluated = set().union(*(_numbers(data / f"eval_{form}.jsonl") for form in FORMS))
    for name in ("pretrain", "align", "control", "cot", "rl", "rl_images"):
        assert not _numbers(data / f"{name}.jsonl") & evaluated, name
