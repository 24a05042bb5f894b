"""Report metrics against their published definitions (BLEU: Papineni et al. 2002; ROUGE-L: Lin 2004;
METEOR: Banerjee & Lavie 2005 as NLTK computes it), the clinical rates against scikit-learn on labels
known by construction, and the inputs that used to be scored wrongly or crash."""
import io
import json
import math
import random
import re
import urllib.request
from collections import Counter

import numpy as np
import pytest

from nvfm import report_metrics as rm

needs_wordnet = pytest.mark.skipif(rm.wordnet_missing() is not None,
                                   reason=f"METEOR's WordNet is not installed ({rm.wordnet_missing()})")


# ----------------------------------------------------------------------------- text metrics

def _bleu2(hyps, refs):
    """Papineni corpus BLEU, N = 2, uniform weights: clipped n-gram counts summed over the corpus,
    brevity penalty exp(1 - r / c) from the corpus lengths; a zero precision of order n smoothed
    as sacrebleu's "exp" does (1 / (2^k * total), k counting the zero orders), 0 without a single
    match (sacrebleu's rule, as unsmoothed BLEU). Tokens: case kept, word runs and single
    punctuation marks (13a on this alphabet)."""
    tok = lambda s: re.findall(r"\w+|[^\w\s]", s)
    match, total, c, r = [0, 0], [0, 0], 0, 0
    for h, ref in zip(hyps, refs):
        a, b = tok(h), tok(ref)
        c, r = c + len(a), r + len(b)
        for n in (1, 2):
            hn = Counter(tuple(a[i:i + n]) for i in range(len(a) - n + 1))
            rn = Counter(tuple(b[i:i + n]) for i in range(len(b) - n + 1))
            match[n - 1] += sum(min(v, rn[g]) for g, v in hn.items())
            total[n - 1] += max(len(a) - n + 1, 0)
    if not any(match):
        return 0.0
    p, k = [], 1
    for m, t in zip(match, total):
        if m == 0:
            k *= 2
            p.append(1 / (k * t))
        else:
            p.append(m / t)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(math.log(x) for x in p) / 2)


def _lcs(a, b):
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            d[i + 1][j + 1] = d[i][j] + 1 if x == y else max(d[i][j + 1], d[i + 1][j])
    return d[-1][-1]


def _rouge_l(hyp, ref):
    """Lin's LCS F-measure (beta 1, as rouge-score) on lower-cased [a-z0-9] runs, Porter stems of
    tokens over 3 characters (rouge-score's stemming tokenizer)."""
    from nltk.stem.porter import PorterStemmer
    st = PorterStemmer()
    tok = lambda s: [st.stem(t) if len(t) > 3 else t for t in re.findall(r"[a-z0-9]+", s.lower())]
    a, b = tok(hyp), tok(ref)
    lcs = _lcs(a, b)
    return 0.0 if lcs == 0 else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b))


WORDS = "Left right subdural hematoma acute chronic midline shift no mass effect the is of small frontal".split()


def test_bleu2_and_rouge_l_are_the_published_definitions_on_random_corpora():
    """Corpus-level BLEU-2 (one brevity penalty over the corpus, references shorter and longer than
    the hypotheses) and ROUGE-L as the mean of per-study F, against brute force."""
    rnd = random.Random(0)
    sent = lambda: " ".join(rnd.choices(WORDS, k=rnd.randint(2, 10))) + rnd.choice([".", "", ", mild."])
    for _ in range(60):
        n = rnd.randint(1, 5)
        hyps = [[sent() for _ in range(rnd.randint(1, 2))] for _ in range(n)]
        refs = [[sent() for _ in range(rnd.randint(1, 2))] for _ in range(n)]
        h, r = [" ".join(x) for x in hyps], [" ".join(x) for x in refs]
        m = rm.text_metrics(hyps, refs)
        assert m["bleu2"] == pytest.approx(_bleu2(h, r), rel=1e-9)
        assert m["rougeL"] == pytest.approx(np.mean([_rouge_l(a, b) for a, b in zip(h, r)]), rel=1e-9)
        assert m["n_text_pairs"] == n


def test_text_metrics_hand_worked_cases():
    # reference shorter than the hypothesis: no brevity penalty; 3 of 5 unigrams, 2 of 4 bigrams
    m = rm.text_metrics([["xq yq zq wq vq"]], [["xq yq zq"]])
    assert m["bleu2"] == pytest.approx(math.sqrt(3 / 5 * 2 / 4))
    assert m["rougeL"] == pytest.approx(2 * 0.6 * 1.0 / 1.6)
    # no bigram in common: exp smoothing, 1 / (2 * 1)
    assert rm.text_metrics([["aq bq"]], [["bq aq"]])["bleu2"] == pytest.approx(math.sqrt(1 * 0.5))
    # BLEU keeps case (13a, case-sensitive), ROUGE-L lower-cases: "Xq" is no unigram match for BLEU
    m = rm.text_metrics([["Xq yq zq"]], [["xq yq zq wq"]])
    assert m["bleu2"] == pytest.approx(math.exp(1 - 4 / 3) * math.sqrt(2 / 3 * 1 / 2))
    assert m["rougeL"] == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    # identical reports
    m = rm.text_metrics([["Left subdural hematoma."]], [["Left subdural hematoma."]])
    assert m["bleu2"] == pytest.approx(1.0) and m["rougeL"] == pytest.approx(1.0)
    # an empty report facing a non-empty one is the text "No positive findings."; both empty: left out
    m = rm.text_metrics([[], [], ["Meningioma."]], [["No positive findings seen."], [], []])
    assert (m["n_text_pairs"], m["n_both_empty"]) == (2, 1)
    assert m["rougeL"] == pytest.approx((_rouge_l("No positive findings.", "No positive findings seen.")
                                         + _rouge_l("Meningioma.", "No positive findings.")) / 2)
    assert m["bleu2"] == pytest.approx(_bleu2(["No positive findings.", "Meningioma."],
                                              ["No positive findings seen.", "No positive findings."]))


@needs_wordnet
def test_meteor_hand_worked_without_synonyms():
    """Tokens WordNet does not know: 3 exact matches, P 1, R 3/4, Fmean = PR / (0.9 P + 0.1 R), one
    chunk: penalty 0.5 (1/3)^3."""
    m = rm.text_metrics([["xq yq zq"]], [["xq yq zq wq"]])
    f = 0.75 / (0.9 + 0.075)
    assert m["meteor"] == pytest.approx(f * (1 - 0.5 * (1 / 3) ** 3))


# ----------------------------------------------------------------------------- clinical rates vs sklearn

PHRASES = {"meningioma": "Right frontal meningioma.", "epidural_hematoma": "Left epidural hematoma.",
           "brain_mass_effect": "Mass effect.", "cerebral_atrophy": "Mild generalized volume loss.",
           "pneumocephalus": "Pneumocephalus.", "acute_ischemic_stroke": "Acute left MCA infarct."}
NEGATED = ["No midline shift.", "Negative for hemorrhage.", "Intraventricular hemorrhage is not seen.",
           "Without hydrocephalus.", "Meningioma is unlikely."]


def test_clinical_rates_match_sklearn_on_labels_known_by_construction():
    """diagnosis_f1 = sklearn's samples-averaged F1 (1 for two empty sets), hallucination / omission =
    1 - micro precision / recall, diagnosis_set_accuracy = subset accuracy; the reports mix in negated
    sentences that must name nothing."""
    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
    from sklearn.preprocessing import MultiLabelBinarizer
    names = sorted(PHRASES)
    rnd = random.Random(1)
    for _ in range(40):
        n = rnd.randint(2, 8)
        gt = [rnd.sample(names, rnd.randint(0, 3)) for _ in range(n)]
        gen = [rnd.sample(names, rnd.randint(0, 3)) for _ in range(n)]
        hyps = [[PHRASES[d] for d in g] + rnd.sample(NEGATED, 2) for g in gen]
        truths = [{"study_key": str(i), "findings": [PHRASES[d] for d in g]} for i, g in enumerate(gt)]
        m = rm.evaluate_report_lists(hyps, truths)
        mlb = MultiLabelBinarizer(classes=names)
        y, p = mlb.fit_transform(gt), mlb.transform(gen)
        assert m["diagnosis_f1"] == pytest.approx(f1_score(y, p, average="samples", zero_division=1.0))
        assert m["diagnosis_set_accuracy"] == pytest.approx(accuracy_score(y, p))
        if p.sum():
            assert m["hallucination_rate"] == pytest.approx(1 - precision_score(y, p, average="micro"))
        if y.sum():
            assert m["omission_rate"] == pytest.approx(1 - recall_score(y, p, average="micro"))


# ----------------------------------------------------------------------------- bugs reproduced

def test_a_verbatim_mr_report_of_a_dated_subdural_hematoma_scores_its_triage():
    """An MR record without a triage was triaged from the MR fold of its diagnoses: "Chronic left
    subdural hematoma." became the urgent subdural_hematoma, while the rule judge read the same text
    as the routine subacute_chronic one, so a verbatim copy scored triage accuracy 0 (urgent ->
    routine). The dated text decides; an undated MR lesion alone is still urgent."""
    text = ["Chronic left subdural hematoma."]
    lesion = [{"diagnosis": "subdural_hematoma", "side": "left"}]
    for rec in ({"study_key": "a", "modality": "MR", "findings": text},
                {"study_key": "b", "modality": "MR", "findings": text, "lesions": lesion}):
        m = rm.evaluate_report_lists([text], [rec])
        assert m["triage_accuracy"] == 1.0 and m["triage_confusion"]["routine"]["routine"] == 1, rec
        assert (m["omission_rate"], m["hallucination_rate"]) == (0.0, 0.0)
    m = rm.evaluate_report_lists([["Left subdural hematoma."]],
                                 [{"study_key": "c", "modality": "MR", "findings": [], "lesions": lesion}])
    assert m["triage_confusion"]["urgent"]["urgent"] == 1


@pytest.mark.parametrize("line, msg", [
    ("null", r"r\.jsonl:2: no study_key \(the line is a JSON NoneType, not an object\)"),
    ("5", r"r\.jsonl:2: no study_key \(the line is a JSON int"),
    ('[{"study_key": "b"}]', r"r\.jsonl:2: no study_key \(the line is a JSON list"),
    ('{"study_key": ["b"], "findings": []}', r"r\.jsonl:2: study_key must be a string or a whole number, got a list"),
    ('{"study_key": null, "findings": []}', r"r\.jsonl:2: study_key must be .* got a NoneType"),
])
def test_a_reports_line_without_a_usable_study_is_one_error_naming_file_and_line(tmp_path, line, msg):
    """A reports line that is not an object (a null from a cut write) or whose study is a list was a
    TypeError traceback: evaluate.py catches ValueError only, so the probes' figures were lost."""
    truth = tmp_path / "t.jsonl"
    truth.write_text(json.dumps({"study_key": "a", "findings": []}) + "\n")
    rep = tmp_path / "r.jsonl"
    rep.write_text(json.dumps({"study_key": "a", "findings": []}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=msg):
        rm.evaluate_reports(str(rep), str(truth))
    # the ground-truth reader, which train_llava.py uses before training, refuses the same
    truth.write_text(json.dumps({"study_key": "a", "findings": []}) + "\n" + line.replace("r.jsonl", "t.jsonl") + "\n")
    with pytest.raises(ValueError, match=msg.replace("r\\.jsonl", "t\\.jsonl")):
        rm.read_truth(str(truth))


def _judge_replying(monkeypatch, reply):
    body = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda req, timeout=None: io.BytesIO(body))


@pytest.mark.parametrize("reply, triage", [("Urgent", "urgent"), ("urgent.", "urgent"), ("**Routine**", "routine"),
                                           (" unremarkable\n", "unremarkable"), ("Answer: routine", "routine")])
def test_http_judge_reads_one_class_word(monkeypatch, reply, triage):
    _judge_replying(monkeypatch, reply)
    assert rm.judge_http(["Meningioma."]) == triage


@pytest.mark.parametrize("reply", ["Non-urgent", "Not urgent.", "routine or urgent", "urgently", "John Smith: routine, not urgent"])
def test_http_judge_refuses_a_negated_or_partial_class_word_without_quoting_it(monkeypatch, reply):
    """A substring test scored "Non-urgent" and "Not urgent." as urgent; the error quoted the reply,
    which may repeat the report's text."""
    _judge_replying(monkeypatch, reply)
    with pytest.raises(ValueError, match="did not answer exactly one of") as e:
        rm.judge_http(["Meningioma."])
    assert "John" not in str(e.value) and reply.lower() not in str(e.value).lower()
