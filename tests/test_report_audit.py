"""Report metrics and generator outputs that used to be silently wrong: each case is worked out by
hand (or against the LM's own logits) and failed before its fix."""
import json
import os
import sys

import pytest
import torch

from nvfm import llava
from nvfm import report_metrics as rm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# (sentence, [(diagnosis, side)]) read by hand: a side word belongs to the finding it modifies
SIDE_CASES = [
    ("Right frontal contusion and left subdural hematoma.",
     [("brain_contusion", "right"), ("subdural_hematoma", "left")]),
    ("Subdural hematoma on the right and meningioma on the left.",
     [("subdural_hematoma", "right"), ("meningioma", "left")]),
    ("Meningioma on the left, subdural hematoma on the right.",
     [("meningioma", "left"), ("subdural_hematoma", "right")]),
    ("Arachnoid cyst on the right with meningioma on the left.",
     [("arachnoid_cyst", "right"), ("meningioma", "left")]),
    ("Left and right subdural hematomas.", [("subdural_hematoma", "bilateral")]),
    ("Left frontal and right parietal contusions.", [("brain_contusion", "bilateral")]),
    ("Contusions in the left frontal and right parietal lobes.", [("brain_contusion", "bilateral")]),
    # a side word of a negated finding is not lent to another one
    ("Right frontal meningioma without left subdural hematoma.", [("meningioma", "right")]),
    ("Left MCA infarct with surrounding edema and right subdural hematoma.",
     [("acute_ischemic_stroke", "left"), ("cerebral_edema", "left"), ("subdural_hematoma", "right")]),
    # unchanged readings: after the finding, far before it, the only side word of the sentence
    ("Midline shift of 4 mm to the left from a right subdural hematoma.",
     [("midline_shift", "left"), ("subdural_hematoma", "right")]),
    ("Left parietal lesion, likely metastasis.", [("brain_metastasis", "left")]),
    ("Epidural hematoma, left.", [("epidural_hematoma", "left")]),
]


@pytest.mark.parametrize("sentence,named", SIDE_CASES)
def test_a_side_word_goes_to_the_finding_it_modifies(sentence, named):
    """The nearest side word used to win: in "Right frontal contusion and left subdural hematoma"
    "left" is nearer to "contusion" (5 characters) than "right" (8), so the contusion was left."""
    assert rm.extract_diagnoses(sentence) == named


def test_a_correct_two_sided_report_has_no_laterality_error():
    """Hand-worked: both reports state every side right, so 0 of the 4 stated sides are wrong (was 0.5)."""
    truth = [{"study_key": "a", "findings": [], "triage": "urgent",
              "lesions": [{"diagnosis": "brain_contusion", "side": "right"},
                          {"diagnosis": "subdural_hematoma", "side": "left"}]},
             {"study_key": "b", "findings": [], "triage": "routine",
              "lesions": [{"diagnosis": "meningioma", "side": "left"},
                          {"diagnosis": "arachnoid_cyst", "side": "right"}]}]
    hyp = [["Right frontal contusion and left subdural hematoma."],
           ["Arachnoid cyst on the right and meningioma on the left."]]
    m = rm.evaluate_report_lists(hyp, truth)
    assert m["n_sided"] == 4 and m["laterality_error_rate"] == 0.0
    # a swapped report is still caught: 2 of 4 wrong
    swapped = [["Left frontal contusion and right subdural hematoma."], hyp[1]]
    assert rm.evaluate_report_lists(swapped, truth)["laterality_error_rate"] == 0.5


def test_missing_triage_comes_from_lesions_too():
    """A record without 'triage' used to be triaged from its findings text alone: with its epidural
    hematoma given as a lesion it was 'unremarkable', and the right report scored triage accuracy 0
    while the same lesion counted as a positive it named (omission 0)."""
    truth = [{"study_key": "a", "findings": [], "lesions": [{"diagnosis": "epidural_hematoma", "side": "left"}]},
             {"study_key": "b", "findings": ["Mild generalized cerebral volume loss."]},
             {"study_key": "c", "findings": []}]
    m = rm.evaluate_report_lists([["Left epidural hematoma."], ["Mild generalized cerebral volume loss."], []], truth)
    assert m["triage_accuracy"] == 1.0 and m["omission_rate"] == 0.0
    c = m["triage_confusion"]
    assert c["urgent"]["urgent"] == c["routine"]["routine"] == c["unremarkable"]["unremarkable"] == 1


def test_bad_input_errors_do_not_repeat_report_text(tmp_path):
    """A findings string or a lesion's text used to be quoted into the error (patient names with it)."""
    secret = "Patient John Smith MRN 4471920 seen 2024-03-02: left SDH."
    rep = tmp_path / "r.jsonl"
    rep.write_text(json.dumps({"study_key": "a", "findings": ["x"]}) + "\n")
    bad = [({"findings": secret}, r"'findings' must be a list of strings, got a str"),
           ({"findings": [], "lesions": [{"note": secret}]}, r"lesion 1 has no diagnosis \(keys \['note'\]\)"),
           ({"findings": [], "lesions": secret}, r"'lesions' must be a list of objects, got a str")]
    for rec, msg in bad:
        truth = tmp_path / "f.jsonl"
        truth.write_text(json.dumps(dict(study_key="a", **rec)) + "\n")
        with pytest.raises(ValueError, match=msg) as e:
            rm.evaluate_reports(str(rep), str(truth))
        assert "John" not in str(e.value) and "4471920" not in str(e.value) and "f.jsonl:1" in str(e.value)
    with pytest.raises(ValueError, match=r"r2.jsonl:1: .*got a list holding \['NoneType'\]") as e:
        rep2 = tmp_path / "r2.jsonl"
        rep2.write_text(json.dumps({"study_key": "a", "findings": [secret, None]}) + "\n")
        rm.evaluate_reports(str(rep2), str(tmp_path / "f.jsonl"))
    assert "John" not in str(e.value)


def test_mr_and_ct_names_of_one_finding_are_one_diagnosis():
    """The MR ontology's brain_midline_shift / epidermoid_cyst are what a report's "midline shift" /
    "epidermoid cyst" name (read as the CT labels): two correct MR reports used to score omission
    2/3, hallucination 1/2, set accuracy 0 and urgent omission 1."""
    truth = [{"study_key": "a", "modality": "MR", "findings": [],
              "lesions": [{"diagnosis": "brain_midline_shift", "side": None}]},
             {"study_key": "b", "modality": "MR", "findings": ["Epidermoid cyst in the left cerebellopontine angle."],
              "lesions": [{"diagnosis": "epidermoid_cyst", "side": "left"}]}]
    hyp = [["Midline shift of 5 mm."], ["Epidermoid cyst in the left cerebellopontine angle."]]
    m = rm.evaluate_report_lists(hyp, truth)
    assert (m["omission_rate"], m["hallucination_rate"], m["diagnosis_set_accuracy"], m["urgent_omission_rate"],
            m["n_positive"]) == (0.0, 0.0, 1.0, 0.0, 2)
    # an omitted one is still omitted
    assert rm.evaluate_report_lists([[], hyp[1]], truth)["urgent_omission_rate"] == 1.0
    # the probe cross-check: an MR probe's brain_midline_shift is already in the report, nothing appended
    assert llava.cross_check(hyp[0], {"brain_midline_shift": 0.9}, 0.5) == (hyp[0], [])
    assert llava.cross_check([], {"brain_midline_shift": 0.9}, 0.5)[1] == ["brain_midline_shift"]
    # and its fitted threshold sees those truths: 2 omitting reports, both true positives at 0.8 and 0.9
    recs = [{"findings": [], "lesions": [{"diagnosis": "brain_midline_shift"}]}] * 2 + [{"findings": []}]
    th = llava.fit_cross_check_thresholds([[], [], []], [{"brain_midline_shift": s} for s in (0.9, 0.8, 0.1)],
                                          recs, target=1.0)
    assert th == {"brain_midline_shift": pytest.approx(0.8)}


def test_answer_loss_uses_the_lms_own_head():
    """The loss used to apply the output embedding to the decoder's hidden states, skipping what the
    LM's head does besides (Gemma 2's final logit soft-capping): 19.89 against 13.07 for the
    cross-entropy of the logits generate() decodes from. Reference: the LM's full forward logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from test_llava import MEN, SDH, TINY, _studies
    from nvfm.llm import load_llm, tiny_qwen3_cached
    _, tok = load_llm(tiny_qwen3_cached(**TINY))
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                       pad_token_id=151643, bos_token_id=151643, eos_token_id=151645)
    lm = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(30)   # logits well past the cap
    gen = llava.ReportGenerator(lm, tok, enc_dim=16, dim=32, depth=2, heads=4, n_latents=8).eval()
    studies, inds, fnds = _studies(), ["headache", "fall"], [[SDH], [MEN]]
    with torch.no_grad():
        loss = gen(studies, inds, fnds)
        visual, names = gen._visual(studies)
        ex = [gen.prompts.build(n, i, f) for n, i, f in zip(names, inds, fnds)]
        x, att, lab = gen._embed(ex, visual, pad_left=False)
        logits = lm(inputs_embeds=x, attention_mask=att).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("finding,named", [
    ("Pituitary tumour.", [("pituitary_tumor", None)]),
    ("Left frontal glioma with surrounding oedema.", [("glioma", "left"), ("cerebral_edema", "left")]),
    ("Chronic small vessel ischaemic disease.", [("small_vessel_ischemic_disease", None)]),
    ("Paediatric posterior fossa tumour.", [("pediatric_posterior_fossa_tumor", None)]),
    ("Left acute SDH.", [("acute_subdural_hematoma", "left")]),
    ("Bilateral SDHs, no IVH.", [("subdural_hematoma", "bilateral")]),
    ("Right EDH measuring 1 cm.", [("epidural_hematoma", "right")]),
    ("Right temporal AVM.", [("cerebral_arteriovenous_malformation", "right")]),
])
def test_british_spellings_and_abbreviations_name_the_finding(finding, named):
    """These used to name nothing: a British or abbreviated report omitted every such finding."""
    assert rm.extract_diagnoses(finding) == named


def test_a_batch_without_images_still_runs_the_connector_under_fsdp():
    """Under FSDP every rank must run the connector: a rank whose batch lost all its images
    (image_dropout 0.5 in config/llava_tiny.py) skipped it, and `torchrun ... --fsdp=True` aborted on
    a gloo collective size mismatch (test_llava's NVFM_SLOW_TESTS FSDP test). With the flag train_llava
    sets, the loss is unchanged and the connector gets exactly zero gradients."""
    from test_llava import TINY, _gen
    from nvfm.llm import load_llm, tiny_qwen3_cached
    gen = _gen(load_llm(tiny_qwen3_cached(**TINY)))
    args = ([[], []], ["fall", "headache"], [["Left subdural hematoma."], []])
    plain = gen(*args)
    plain.backward()
    assert all(p.grad is None for p in gen.connector.parameters())
    gen.zero_grad(set_to_none=True)
    gen.always_run_connector = True
    loss = gen(*args)
    loss.backward()
    torch.testing.assert_close(loss, plain)
    grads = [p.grad for p in gen.connector.parameters()]
    assert all(g is not None and not g.any() for g in grads)


# Negation scope, read by hand: (finding, [(diagnosis, side)] named as present)
SCOPE_CASES = [
    # an "and" / "with" that opens a new noun phrase ends the negation: these lost the positive finding
    ("No hemorrhage and a left meningioma.", [("meningioma", "left")]),
    ("No intracranial hemorrhage and a large right frontal meningioma.", [("meningioma", "right")]),
    ("No hemorrhage and an acute left MCA infarct.", [("acute_ischemic_stroke", "left")]),
    ("There is no hydrocephalus and the left meningioma is unchanged.", [("meningioma", "left")]),
    ("No acute hemorrhage and mild generalized cerebral volume loss.", [("cerebral_atrophy", None)]),
    ("No hemorrhage with a left meningioma.", [("meningioma", "left")]),
    ("Without hemorrhage and with a left subdural hematoma.", [("subdural_hematoma", "left")]),
    ("No hemorrhage and a left subdural hematoma and no midline shift.", [("subdural_hematoma", "left")]),
    ("No midline shift despite the large left subdural hematoma.", [("subdural_hematoma", "left")]),
    # a list after a trigger stays negated, whatever joins it
    ("No hemorrhage and no meningioma.", []),
    ("No hemorrhage, mass effect or midline shift.", []),
    ("No hemorrhage, mass effect and midline shift.", []),
    ("No hydrocephalus and mass effect.", []),
    ("No hemorrhage or a left meningioma.", []),
    ("No subdural hematoma and the ventricles are normal.", []),
]


@pytest.mark.parametrize("finding,named", SCOPE_CASES)
def test_a_negation_ends_where_a_new_noun_phrase_begins(finding, named):
    """"No" used to run over "and a left meningioma" to the sentence end: a right report of a
    meningioma scored an omission."""
    assert rm.extract_diagnoses(finding) == named


def test_a_negated_list_with_a_serial_comma_is_negated_to_its_end():
    """", and" used to end the clause: the last item of "No X, Y, and Z" was named, an urgent
    hallucination (midline shift) in a normal report."""
    assert rm.extract_diagnoses("No hemorrhage, mass effect, and midline shift.") == []
    assert rm.extract_diagnoses("No evidence of hydrocephalus, brain herniation, and midline shift.") == []
    assert rm.extract_diagnoses("No hemorrhage, and no mass effect.") == []
    # a new clause after ", and" still ends it
    assert rm.extract_diagnoses("No hemorrhage, and an acute left MCA infarct.") == [("acute_ischemic_stroke", "left")]


@pytest.mark.parametrize("finding,named", [
    # a comma clause with its own affirmation is not in an earlier trigger's scope: these named nothing
    ("No midline shift, hydrocephalus is present.", [("ventriculomegaly", None)]),
    ("No midline shift, hydrocephalus is seen.", [("ventriculomegaly", None)]),
    ("No midline shift or hydrocephalus, left meningioma is seen.", [("meningioma", "left")]),
    ("No hydrocephalus or mass effect, midline shift is also seen.", [("midline_shift", None)]),
    ("No midline shift is present, hydrocephalus is present.", [("ventriculomegaly", None)]),
    # the affirmation of a negated list ("or Z is seen", "Y and Z are identified") or a negated one is not
    ("No acute intracranial hemorrhage, mass effect, midline shift, or hydrocephalus is identified.", []),
    ("No hemorrhage, mass effect and midline shift are identified.", []),
    ("No acute hemorrhage, hydrocephalus is not seen.", []),
    ("Hydrocephalus is present, no midline shift is seen.", [("ventriculomegaly", None)]),
])
def test_a_clause_with_its_own_affirmation_is_not_negated(finding, named):
    assert rm.extract_diagnoses(finding) == named


@pytest.mark.parametrize("finding,named", [
    # the "not" of a post-negation ("X is not present") used to negate forward too: these named nothing
    ("Hydrocephalus is not present, left meningioma.", [("meningioma", "left")]),
    ("Midline shift not seen, left meningioma.", [("meningioma", "left")]),
    ("Hydrocephalus is not present, meningioma is.", [("meningioma", None)]),
    ("Midline shift is not seen and a left meningioma is present.", [("meningioma", "left")]),
    # unchanged: a post-negation at the start of its clause has nothing before it to negate
    ("Not seen: hydrocephalus.", []),
    ("Midline shift is not seen.", []),
])
def test_the_not_of_a_post_negation_negates_nothing_after_it(finding, named):
    assert rm.extract_diagnoses(finding) == named


@pytest.mark.parametrize("finding,named", [
    # a "?" ends its sentence: the negation before it used to run into the next one
    ("No hemorrhage? Left meningioma.", [("meningioma", "left")]),
    ("No hydrocephalus? Left meningioma.", [("meningioma", "left")]),
    # a question answered "No" / "None" names nothing (these named ventriculomegaly / subdural hematoma)
    ("Hydrocephalus? No.", []),
    ("Is there hydrocephalus? No.", []),
    ("Hydrocephalus? No. Left meningioma.", [("meningioma", "left")]),
    ("Hydrocephalus: none.", []),
    ("Hydrocephalus: no.", []),
    ("Subdural hematoma: none; hydrocephalus: none.", []),
    # unchanged: a questioned finding is named, as a "questionable" one is (the hedge policy)
    ("Hydrocephalus?", [("ventriculomegaly", None)]),
    ("Hydrocephalus? Yes.", [("ventriculomegaly", None)]),
    ("Left frontal mass ?meningioma.", [("meningioma", "left")]),
    ("Questionable hydrocephalus.", [("ventriculomegaly", None)]),
    ("Left meningioma? No hydrocephalus.", [("meningioma", "left")]),
])
def test_a_question_mark_is_a_hedge_and_ends_its_sentence(finding, named):
    assert rm.extract_diagnoses(finding) == named


@pytest.mark.parametrize("finding,named", [
    # a finding that partly resolved, or had not resolved, is there: these named nothing
    ("Partial resolution of the left subdural hematoma.", [("subdural_hematoma", "left")]),
    ("Near complete resolution of the left subdural hematoma.", [("subdural_hematoma", "left")]),
    ("The left subdural hematoma has partially resolved.", [("subdural_hematoma", "left")]),
    ("Incompletely resolved left subdural hematoma.", [("subdural_hematoma", "left")]),
    ("The left subdural hematoma has not resolved.", [("subdural_hematoma", "left")]),
    ("Left subdural hematoma, not resolved.", [("subdural_hematoma", "left")]),
    # a new finding, not seen on the prior study, is there
    ("Left subdural hematoma, not seen previously.", [("subdural_hematoma", "left")]),
    ("New left subdural hematoma not present on the prior study.", [("subdural_hematoma", "left")]),
    # one resolved next to one that is there
    ("Left subdural hematoma has resolved and a right subdural hematoma is seen.", [("subdural_hematoma", "right")]),
    # unchanged: a resolved finding is not there, an unchanged one is
    ("Resolved left subdural hematoma.", []),
    ("Interval resolution of the intraventricular hemorrhage.", []),
    ("The previously seen left subdural hematoma has resolved.", []),
    ("No change in the left subdural hematoma.", [("subdural_hematoma", "left")]),
    ("Meningioma not previously seen.", [("meningioma", None)]),
])
def test_partly_resolved_and_new_findings_are_there(finding, named):
    assert rm.extract_diagnoses(finding) == named


def test_a_right_report_with_a_negation_first_scores_no_omission():
    """Hand-worked: both positives are named, so omission 0 of 2 and set accuracy 1 (were 2/2 and 0)."""
    truth = [{"study_key": "a", "findings": [], "triage": "routine",
              "lesions": [{"diagnosis": "meningioma", "side": "left"}, {"diagnosis": "ventriculomegaly"}]}]
    hyp = [["No hemorrhage and a left meningioma.", "No midline shift, hydrocephalus is present."]]
    m = rm.evaluate_report_lists(hyp, truth)
    assert (m["omission_rate"], m["hallucination_rate"], m["diagnosis_set_accuracy"], m["n_mentioned"]) == (
        0.0, 0.0, 1.0, 2)


def test_an_mr_subdural_hematoma_of_any_age_is_one_finding():
    """An MR reference "Acute left subdural hematoma." with its subdural_hematoma lesion used to be
    two truths (acute_subdural_hematoma and subdural_hematoma): a verbatim copy scored omission 0.5.
    In an MR study the dated CT names are the MR ontology's one subdural_hematoma; a CT study keeps
    them apart (an undated report is not the acute one). Figures worked out by hand."""
    mr = {"study_key": "m", "modality": "MR", "findings": ["Acute left subdural hematoma."],
          "lesions": [{"diagnosis": "subdural_hematoma", "side": "left"}], "triage": "urgent"}
    for hyp in (["Acute left subdural hematoma."], ["Left subdural hematoma."], ["Chronic left subdural hematoma."]):
        m = rm.evaluate_report_lists([hyp], [mr])
        assert (m["omission_rate"], m["hallucination_rate"], m["diagnosis_set_accuracy"]) == (0.0, 0.0, 1.0), hyp
        assert m["n_positive"] == 1 and m["laterality_error_rate"] == 0.0
    m = rm.evaluate_report_lists([["Right subdural hematoma."]], [mr])
    assert m["laterality_error_rate"] == 1.0 and m["omission_rate"] == 0.0
    ct = dict(mr, modality="CT", lesions=[{"diagnosis": "acute_subdural_hematoma", "side": "left"}])
    m = rm.evaluate_report_lists([["Left subdural hematoma."]], [ct])
    assert (m["omission_rate"], m["hallucination_rate"]) == (1.0, 1.0)
    m = rm.evaluate_report_lists([["Acute left subdural hematoma."]], [ct])
    assert (m["omission_rate"], m["hallucination_rate"], m["diagnosis_set_accuracy"]) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("finding, named", [
    # a midline shift's side is its direction: never lent by the lesion that causes it
    ("Left subdural hematoma with a midline shift.", [("subdural_hematoma", "left"), ("midline_shift", None)]),
    ("Large left frontal mass with midline shift.", [("midline_shift", None)]),
    ("Left subdural hematoma with 5 mm midline shift to the right.",
     [("subdural_hematoma", "left"), ("midline_shift", "right")]),
    # the demo phantom's wording
    ("Mass effect with 5 mm rightward midline shift.", [("brain_mass_effect", None), ("midline_shift", "right")]),
    ("Mass effect with 3 mm leftward midline shift.", [("brain_mass_effect", None), ("midline_shift", "left")]),
])
def test_a_midline_shift_has_the_side_of_its_direction(finding, named):
    assert rm.extract_diagnoses(finding) == named


@pytest.mark.parametrize("finding, named", [
    # a bare "absent" negates back only at the end of its clause or before a comma
    ("Postsurgical changes of left frontal craniectomy with absent bone flap.",
     [("postsurgical_changes", None), ("craniotomy", "left")]),
    ("Midline shift absent, left meningioma.", [("meningioma", "left")]),
    ("Hydrocephalus is absent, left meningioma.", [("meningioma", "left")]),
    ("Hydrocephalus absent.", []),
    ("Absent hydrocephalus.", []),
])
def test_absent_negates_what_it_is_said_of(finding, named):
    assert rm.extract_diagnoses(finding) == named
