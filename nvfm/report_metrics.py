"""Report metrics: text overlap, clinical correctness against the structured ground truth, triage.

Implementations (all offline):
  BLEU-2   sacrebleu `BLEU(max_ngram_order=2)` corpus score (13a tokenizer, case-sensitive, exp
           smoothing, brevity penalty over the corpus), / 100
  ROUGE-L  rouge-score `RougeScorer(["rougeL"], use_stemmer=True)` F-measure, mean over studies, with
           its tokenizer (lower case, runs of letters/digits, Porter stems of words over 3 letters)
           reading letters of every script (`RougeTokenizer`): the same tokens on ASCII text, where
           rouge-score's own drops non-ASCII letters (identical Cyrillic reports scored 0)
  METEOR   NLTK `meteor_score` (exact + Porter stem + WordNet synonym matching, alpha 0.9, beta 3,
           gamma 0.5) on `meteor_tokens` (lower case, letter/digit runs of any script, punctuation
           marks), mean over studies. NLTK's METEOR is not the METEOR 1.5 jar (no paraphrase
           table), so numbers are not comparable with papers that used the jar. WordNet 3.0 is read
           from the Debian `wordnet-base` + `wordnet-sense-index` files (/usr/share/wordnet): an
           NLTK-readable `corpora/wordnet` folder (a copy, ~30 MB) plus the `lexnames` table is built in
           a cache dir at first use; nothing is downloaded. Without those files METEOR is NaN (null)
           with a `meteor_note`; BLEU-2 and ROUGE-L are unaffected.
A report is the list of finding strings; for the text metrics it is joined with spaces and
NFKC-normalised (a decomposed accent is the composed letter). Studies
whose generated and reference reports are both empty are left out of the three text metrics
(n_both_empty); an empty report facing a non-empty one is scored as "No positive findings.".

Clinical metrics use the diagnosis names of nvfm.ontology found in the finding text
(`extract_diagnoses`: longest phrase first, side from left/right/bilateral words; NegEx-style
negation):
  hallucination_rate      mentioned (study, diagnosis) pairs that are not positive / all mentioned
  omission_rate           positive (study, diagnosis) pairs not mentioned / all positive
  urgent_omission_rate    the same for urgent positives (what probe cross-checking targets)
  laterality_error_rate   mentioned true positives with a one-sided ground truth whose stated
                          side is wrong / those that state a side
  diagnosis_set_accuracy  studies whose set of named diagnoses equals the ground truth's (sides ignored)
  diagnosis_f1            mean per-study F1 of those sets (1 when both are empty)
  triage_accuracy         judge(generated findings, indication) == ground-truth triage (one of
                          unremarkable / routine / urgent, case ignored; anything else is an error;
                          a record without one: nvfm.ontology.triage of the diagnoses its text names as
                          written, as the rule judge reads a report (an MR "chronic subdural hematoma" is
                          routine), and of its lesions the text does not name)
Hedges: a finding called improbable ("X is unlikely", "less likely", "not likely",
"doubtful", "improbable", "no definite X", "no evidence of X") is not named, as "no X" is; one called
possible ("possible", "probable", "likely", "suspected", "suspicious for", "questionable",
"cannot exclude / rule out X", "X cannot be (entirely) excluded", "X is not excluded") is named,
a positive mention like any other: a report that raises a diagnosis is scored as naming it
(a hallucination when the study does not have it), and its triage counts it. A question mark is a
hedge of the same kind: "Hydrocephalus?" and "?meningioma" name the finding, as "questionable"
does; a "?" followed by a space ends the sentence like a full stop (a negation before it stops
there), unless the next sentence is just its answer "No" / "None" / "Negative", which negates it
("Hydrocephalus? No." names nothing, like "Hydrocephalus: none").
Wordings mapped where the ontology name is unambiguous (`_PATTERNS`): "contusion" -> brain_contusion
(not a scalp contusion), "glioblastoma" / "GBM" -> high_grade_glioma, "depressed fracture" ->
displaced_skull_fracture, "basilar skull fracture" -> skull_base_fracture, a hydrocephalus that is
not called obstructive / non-communicating (nor "ex vacuo") -> ventriculomegaly. An unqualified
"skull fracture" names nothing: the ontology splits fractures by displacement. British spellings
(haemorrhage, oedema, ischaemic, tumour) and the abbreviations SDH, EDH, IVH, IPH, ICH, SAH, AVM,
DAI read as the words they stand for. MR and CT labels of one finding (nvfm.ontology.SAME_FINDING)
are compared as the CT label. In an MR study (the record's `modality`) a subdural hematoma is one
finding whatever its age, as the MR ontology has it (subdural_hematoma): the CT names
acute_subdural_hematoma and subacute_chronic_subdural_hematoma are scored as it, on both sides (an
MR reference "Acute left subdural hematoma." with a subdural_hematoma lesion is one finding, not two).
Judges: "rules" (default, transparent): triage = nvfm.ontology.triage of the diagnoses named in
the findings. "http": any OpenAI-compatible /v1/chat/completions endpoint (a local llama.cpp,
vLLM or Ollama server), asked to answer with one word; a reply that names none or several of the three
(as whole words: "non-urgent" is none) or negates one ("not urgent") is an error, not a triage.
"""
import difflib
import json
import os
import re
import shutil
import unicodedata
import urllib.request

from nvfm.ontology import DIAGNOSES, same_finding, triage

EMPTY_REPORT = "No positive findings."
TRIAGE_CLASSES = ("unremarkable", "routine", "urgent")
WORDNET_SRC = "/usr/share/wordnet"
_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
             "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
             "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
             "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
             "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
             "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
             "adj.ppl").split()
_POS_NUM = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}

# ----------------------------------------------------------------------------- diagnosis mentions

# extra surface forms (normalised text) for ontology names whose words are not how a report says it
_SYNONYMS = {
    "subacute_chronic_subdural_hematoma": ["subacute chronic subdural hematoma", "chronic subdural hematoma",
                                           "subacute subdural hematoma"],
    "cavernous_malformation_cavernoma": ["cavernous malformation", "cavernoma"],
    "rathkes_cleft_cyst": ["rathke s cleft cyst", "rathke cleft cyst"],
    "intracranial_epidermoid_dermoid_cyst": ["epidermoid cyst", "dermoid cyst"],
    "cerebral_arteriovenous_malformation": ["arteriovenous malformation"],
    "brain_midline_shift": ["midline shift"],
    "craniotomy_craniectomy": ["craniotomy", "craniectomy"],
    "aneurysmal_subarachnoid_hemorrhage": ["aneurysmal subarachnoid hemorrhage"],
    "encephalomalacia_gliosis": ["encephalomalacia", "gliosis"],
    "chordoma_chondrosarcoma": ["chordoma", "chondrosarcoma"],
    "pachygyria_lissencephaly": ["pachygyria", "lissencephaly"],
    "scalp_hemorrhage_hematoma": ["scalp hematoma", "scalp hemorrhage"],
    "subdural_hygroma_effusions": ["subdural hygroma", "subdural effusion", "subdural effusions"],
}
# report wording -> ontology name, tried before the literal names (normalised text: lower case,
# non-alphanumerics as spaces); order matters, each match is blanked before the next rule
_PATTERNS = [
    (r"chronic( \w+){0,3} subdural hematoma", "subacute_chronic_subdural_hematoma"),
    (r"acute( \w+){0,3} subdural hematoma", "acute_subdural_hematoma"),
    (r"intraparenchymal (hemorrhage|hematoma)", "intraparenchymal_hemorrhage"),
    (r"(lacunar( \w+){0,2} infarct(ion)?s?|lacunes?)", "lacunar_stroke"),
    # an old infarct is not the (urgent) acute one; words between may not be "acute"
    (r"(chronic|old|remote)( (?!(sub)?acute )\w+){0,3} infarct(ion)?s?", "chronic_ischemic_stroke"),
    (r"(acute( \w+){0,4} )?infarct(ion)?s?", "acute_ischemic_stroke"),
    (r"metastas[ie]s", "brain_metastasis"),
    (r"(vasogenic|surrounding|perilesional) edema", "cerebral_edema"),
    # a plain "skull fracture" names neither: the ontology splits fractures by displacement
    (r"(non ?|un)displaced( \w+){0,3} fracture", "nondisplaced_skull_fracture"),
    (r"(basilar|basal)( \w+){0,2} fracture|fracture of the( \w+)? skull base", "skull_base_fracture"),
    (r"(depressed|displaced)( \w+){0,3} fracture", "displaced_skull_fracture"),   # depressed: displaced inwards
    (r"(?<!scalp )(?<!soft tissue )contusion", "brain_contusion"),
    (r"glioblastoma( multiforme)?|gbm", "high_grade_glioma"),                     # WHO grade 4
    (r"(obstructive|non communicating|noncommunicating)( \w+){0,2} hydrocephalus", "obstructive_hydrocephalus"),
    # any other hydrocephalus (communicating, normal pressure, unqualified) has enlarged ventricles
    (r"hydrocephalus(?! ex vacuo)", "ventriculomegaly"),
    (r"(generali[sz]ed|diffuse) (cerebral )?volume loss", "cerebral_atrophy"),
    (r"mass effect", "brain_mass_effect"),
]
# NegEx-style negation (Chapman et al. 2001), on normalised text. A pre-negation trigger negates
# every mention after it up to the end of its clause; a post-negation trigger every mention
# before it back to the start of its clause. Clauses end at the sentence end (`extract_diagnoses`
# splits sentences) and at termination terms. Pseudo-triggers ("no change in", "cannot be
# excluded", "partial resolution of", "not seen on the prior") look like negations but are not:
# text they cover triggers nothing. A clause's last word "no" / "none" / "negative" negates back
# (the answer of "Hydrocephalus: none", "Hydrocephalus? No.").
# Hedges: a finding called improbable ("unlikely", "less likely", "doubtful", "improbable") is
# negated like "no"; one called possible ("cannot be excluded", "cannot rule out", "possible",
# "questionable", "suspected") is a mention (no trigger, or a pseudo-trigger).
_IMPROBABLE = r"(unlikely|less likely|not likely|doubtful|improbable)"
_PRE_NEG = re.compile(r"(?<= )(no|not|without|negative for|absence of|absent|free of|resolution of|resolved|"
                      rf"rules? out|ruled out|neither|nor|{_IMPROBABLE})(?= )")
# "X is unlikely" / "X, unlikely" negate back; "unlikely Y" / "unlikely to represent Y" only forward
_POST_NEG = re.compile(r"(?<= )((is|are|was|were|has been|have been) )?((not|no longer) (seen|identified|present|"
                       r"visuali[sz]ed|demonstrated|evident|appreciated|detected|noted)|absent|excluded|ruled out|"
                       r"(has |have )?resolved)(?= )|"
                       r"(?<= )(is|are|was|were|appears?|seems?|considered|felt|thought|deemed)( to be)? "
                       rf"((considered|felt|thought|deemed) )?{_IMPROBABLE}(?= )|(?<= ){_IMPROBABLE}(?= $)|"
                       r"(?<= )(no|none|negative)(?= $)")   # a clause's last word: "Hydrocephalus: none", "X? No."
_PSEUDO_NEG = re.compile(r"(?<= )(no (significant |substantial |definite |interval |appreciable )*(change|increase|"
                         r"decrease|enlargement|growth|progression|worsening)|without (significant |interval )*change|"
                         r"not only|(cannot|can not|can t|could not|may not|not)( be| been)?( entirely| completely|"
                         r" totally| fully| definitely| definitively| confidently| reliably)? (excluded|ruled out|"
                         r"exclude|rule out)|"
                         # a finding partly resolved, or not seen before, is there now
                         r"(partial|incomplete|near complete|nearly complete|almost complete|near total)( interval)? "
                         r"resolution|(partially|incompletely|nearly|almost|not|not yet|not completely|not fully) "
                         r"resolved|not (previously (seen|present|visible|identified|demonstrated)|(seen|present|"
                         r"visible|identified|demonstrated) (previously|before|earlier|(on|in) (the )?(prior|previous|"
                         r"earlier|comparison))))(?= )")
# clause ends, matched on the lower-cased sentence before normalisation (a comma matters in ", with").
# ConText's rule (Harkema et al. 2009, medspaCy's TERMINATE): scope ends at a termination term, not at "and" or a comma.
# So a list stays negated ("no X, Y, and Z"), but an "and" / "with" that opens a new noun phrase ("and a Y", "and mild
# Y", "with a Y") and a comma clause with its own affirmation ("no X, Y is present") start a clause as "there is" does.
_AFFIRMED = (r"\b(is|are|was|were)( also| again| now| still)? "
             r"(present|seen|noted|identified|evident|demonstrated|visuali[sz]ed|appreciated)\b")
_TERMINATION = re.compile(r"\b(but|however|although|though|yet|whereas|except|apart from|aside from|other than|"
                          r"which|there (is|are)|secondary to|due to|despite|in spite of)\b|,\s*(with|there)\b|"
                          r"(,\s*)?\band(?= (a|an|the|there|with|mild|moderate|severe|marked)\b)|\bwith(?= (a|an)\b)|"
                          rf",(?=((?!\b(or|nor|and)\b)[^,])*?{_AFFIRMED})")   # not "no X, Y or Z is seen"


# British spellings and the abbreviations reports use for the ontology's words
_SPELLING = (("haemorrh", "hemorrh"), ("haemat", "hemat"), ("oedem", "edem"), ("ischaem", "ischem"),
             ("tumour", "tumor"), ("paediatric", "pediatric"))
_ABBREVIATIONS = {"sdh": "subdural hematoma", "edh": "epidural hematoma", "ivh": "intraventricular hemorrhage",
                  "iph": "intraparenchymal hemorrhage", "ich": "intracranial hemorrhage",
                  "sah": "subarachnoid hemorrhage", "avm": "arteriovenous malformation", "dai": "diffuse axonal injury"}
_ABBREVIATION = re.compile(rf"(?<= )({'|'.join(_ABBREVIATIONS)})(s?)(?= )")


def _norm(text):
    text = text.lower()
    for a, b in _SPELLING:
        text = text.replace(a, b)
    text = " " + re.sub(r"[^a-z0-9]+", " ", text).strip() + " "
    return _ABBREVIATION.sub(lambda m: _ABBREVIATIONS[m.group(1)] + m.group(2), text)


def diagnosis_phrase(name):
    """Readable phrase of an ontology name: 'acute_subdural_hematoma' -> 'acute subdural hematoma'."""
    return _SYNONYMS.get(name, [name.replace("_", " ")])[0]


def _rule_table():
    """[(compiled regex, name)]: the wording patterns, then every ontology name and synonym as a
    literal phrase, longest first (so "subdural hematoma" never steals "acute subdural hematoma");
    each may end in a plural s / es."""
    lit = []
    for name in DIAGNOSES:
        for form in {name.replace("_", " ")} | set(_SYNONYMS.get(name, [])):
            lit.append((form, name))
    lit.sort(key=lambda t: -len(t[0]))
    plural = "(?:e?s)?"   # "subdural hematomas", "fractures" name the finding too
    rules = [(re.compile(rf"(?<= )(?:{p}){plural}(?= )"), n) for p, n in _PATTERNS]
    return rules + [(re.compile(rf"(?<= ){re.escape(f)}{plural}(?= )"), n) for f, n in lit]


_RULES = _rule_table()
# "rightward": a shift's side; "bilaterally": as "bilateral"
_SIDE = re.compile(r"(?<= )(left|right|bilateral|both)(?:ward|(?<=bilateral)ly)?(?= )")
_BREAK = re.compile(r"[,:()\[\]]")
# words that end a premodifier ("left frontal contusion"): a side word followed by one of these
# describes what came before it ("hematoma on the left", "infarct of the right MCA territory")
_NOT_PREMOD = set("""of in on at along to toward towards with without and or nor from by for into within
    involving over under near across through extending abutting adjacent the a an is are was were be been
    has have there this that which than measuring compatible consistent suggestive likely seen noted also
    as but no not""".split())


def _clauses(sentence):
    """Normalised sentence with its clauses joined by " | " (`_TERMINATION`), the (start, end)
    span of each clause in that text, and the positions of the spaces that stand for a comma,
    colon or bracket inside a clause (`_side_owners` reads them: "on the left, subdural ...")."""
    low, cuts = sentence.lower(), [0]
    for m in _TERMINATION.finditer(low):
        cuts.append(m.start())
    cuts.append(len(low))
    text, spans, breaks = " ", [], set()
    for a, b in zip(cuts[:-1], cuts[1:]):
        # normalising the pieces and joining them with one space gives _norm of the whole clause
        pieces = [q for q in (_norm(x).strip() for x in _BREAK.split(low[a:b])) if q]
        if pieces:
            start = len(text)
            for q in pieces[:-1]:
                text += q + " "
                breaks.add(len(text) - 1)
            text += pieces[-1]
            spans.append((start, len(text)))
            text += " | "
    return (text[:-2] if spans else text), spans, breaks


def negated_spans(text, spans, breaks=()):
    """[(start, end)] character ranges of a `_clauses` text that are negated (NegEx scope).
    breaks: the text's comma positions (`_clauses`). A bare "absent" negates back only where it ends
    its clause or comes before a comma ("X absent, Y": X), else forward only ("craniectomy with
    absent bone flap", "absent hydrocephalus")."""
    pseudo = [m.span() for m in _PSEUDO_NEG.finditer(text)]
    real = lambda m: not any(a < m.end() and m.start() < b for a, b in pseudo)
    out = []
    for cs, ce in spans:   # text[cs - 1] and text[ce] are spaces: the triggers' lookarounds see them
        ends = lambda m: text[m.end():ce].strip() == "" or any(m.end() <= p <= m.end() + 1 for p in breaks)
        post = [m for m in _POST_NEG.finditer(text, cs - 1, ce + 1) if real(m) and (m.group() != "absent" or ends(m))]
        # the longest trigger wins (NegEx): the "not" of "X is not seen" negates nothing after it
        inner = lambda m: any(cs < p.start() <= m.start() and m.end() <= p.end()
                              and (len(p.group()) > len(m.group()) or p.group() == "absent") for p in post)
        out += [(m.end(), ce) for m in _PRE_NEG.finditer(text, cs - 1, ce + 1) if real(m) and not inner(m)]
        out += [(cs, m.start()) for m in post]
    return out


def extract_diagnoses(finding):
    """Diagnoses named in one finding string -> list of (name, side) with side in
    {"left", "right", "bilateral", None}, in order of mention. Each sentence is read on its own:
    a negated mention is skipped (NegEx-style scope: "No evidence of hemorrhage, mass effect, or
    midline shift" negates all three; "Left subdural hematoma without midline shift" only the
    shift; "but", "however", "which", "there is", an "and" / "with" opening a new noun phrase ("No
    hemorrhage and a left meningioma") and a comma clause with its own affirmation ("No midline
    shift, hydrocephalus is present") end a negation's clause, "No X, Y, and Z" does not; "unlikely",
    "doubtful" negate, "cannot be excluded", "possible", "questionable" do not: see the module
    docstring), and a lateral diagnosis takes the side words it owns (`_side_owners`; a midline
    shift only those of its direction, "to the right", "rightward", never its cause's). A diagnosis
    mentioned more than once is listed once, at its first mention, with the sides of all its
    mentions merged by `report_diagnoses`' rule (a side stated anywhere wins over None; two
    different sides make 'bilateral'), so "Subdural hematoma. Right subdural hematoma ..." is
    right-sided. Names are `nvfm.ontology.same_finding`'s: "midline shift" is midline_shift in an
    MR report too (the MR ontology's brain_midline_shift)."""
    out = {}
    # not at decimal points (3.4 x 3.3 cm), nor at a "?" that prefixes a word ("?meningioma") or is answered ("X? No.")
    for sentence in re.split(r"[;\n]|\.(?!\d)|\?(?=\s|$)(?!\s*(?i:no|none|negative)\s*(?:[.;\n]|$))", finding):
        text, spans, breaks = _clauses(sentence)
        neg = negated_spans(text, spans, breaks)
        orig, mentions = text, []
        for rx, name in _RULES:
            for m in list(rx.finditer(text)):
                a, b = m.span()
                mentions.append((a, b, name, any(na <= a < nb for na, nb in neg)))
            text = rx.sub(lambda m: "#" * len(m.group(0)), text)
        mentions.sort()
        owned = _side_owners(orig, breaks, [(a, b) for a, b, _, _ in mentions],
                             [same_finding(name) != "midline_shift" for _, _, name, _ in mentions])
        for i, (a, b, name, negated) in enumerate(mentions):
            if negated:
                continue
            side = None
            if DIAGNOSES[name].lateral:
                for s in owned[i]:
                    side = s if side in (None, s) else "bilateral"
            _merge_side(out, same_finding(name), side)
    return list(out.items())


def _side_owners(text, breaks, mentions, borrow=None):
    """Side words of a `_clauses` text -> per mention (sorted (start, end) spans, negated ones too)
    the list of sides it owns. A side word inside a mention ("acute left subdural hematoma") or
    before it with only modifiers between ("right frontal contusion", "left and right subdural
    hematomas") is that mention's; one after a mention ("hematoma on the left", "epidural hematoma,
    left") is the nearest preceding mention's in its clause. A mention that owns none and follows
    another with "with" ("left infarct with surrounding edema") has that one's sides; else it takes the
    nearest side word no mention owns ("left parietal lesion, likely metastasis"), never one that
    another mention owns: "Right frontal contusion and left subdural hematoma" has a right contusion.
    borrow (per mention, default all True): False for a mention that takes only side words it owns
    (a midline shift's side is its direction, not its cause's: "left SDH with midline shift")."""
    sides = [(m.start(), m.end(), "bilateral" if m.group(1) == "both" else m.group(1))
             for m in _SIDE.finditer(text)]
    owner = [None] * len(sides)

    def modifiers(a, b, allow=()):   # text[a:b] holds words that may stand between a side and its noun
        words = text[a:b].split()
        return (len(words) <= 5 and "|" not in words and not any(a <= p < b for p in breaks)
                and all(w not in _NOT_PREMOD or w in allow for w in words))

    for k in range(len(sides) - 1, -1, -1):   # right to left: "left and right X" chains onto X
        sa, sb, _ = sides[k]
        inside = [i for i, (a, b) in enumerate(mentions) if a <= sa and sb <= b]
        nxt = [i for i, (a, b) in enumerate(mentions) if a >= sb]
        prev = [i for i, (a, b) in enumerate(mentions) if b <= sa and "|" not in text[b:sa]]
        cuts = [p for p in breaks if prev and mentions[prev[-1]][1] <= p < sa]
        if cuts and len(text[max(cuts):sa].split()) > 3:   # "X, largest 2 cm in the left lobe": not X's side
            prev = []
        if inside:
            owner[k] = inside[0]
        elif nxt and modifiers(sb, mentions[nxt[0]][0]):
            owner[k] = nxt[0]
        elif (k + 1 < len(sides) and owner[k + 1] is not None and mentions[owner[k + 1]][0] > sides[k + 1][0]
              and modifiers(sb, sides[k + 1][0], allow=("and", "or", "than"))):
            owner[k] = owner[k + 1]
        elif prev:
            owner[k] = prev[-1]
    out = [[s for (_, _, s), o in zip(sides, owner) if o == i] for i in range(len(mentions))]
    free = [s for s, o in zip(sides, owner) if o is None]
    for i, (a, b) in enumerate(mentions):
        if borrow is not None and not borrow[i]:
            continue
        link = text[mentions[i - 1][1]:a].split() if i else []
        if link[:1] == ["|"]:   # ", with" ends a clause
            link = link[1:]
        if not out[i] and link[:1] == ["with"] and "|" not in link:
            out[i] = list(out[i - 1])   # "left MCA infarct with (surrounding) edema": the same lesion's side
        if not out[i] and free:
            out[i] = [min(free, key=lambda s: max(a - s[1], s[0] - b, 0))[2]]
    return out


def _merge_side(out, name, side):
    """out[name] <- side merged with the side already there: a side stated anywhere wins over
    None; two different sides make 'bilateral'."""
    prev = out.get(name)
    if prev is None:
        out[name] = side
    elif side is not None and side != prev:
        out[name] = "bilateral"


def report_diagnoses(findings):
    """{name: side} over a list of finding strings (a side stated anywhere wins over None;
    two different sides make 'bilateral')."""
    out = {}
    for f in findings:
        for name, side in extract_diagnoses(f):
            _merge_side(out, name, side)
    return out


def _lesion_error(record):
    """Why a findings.jsonl record's lesions cannot be scored, or None: each must be an object whose
    diagnosis is an nvfm.ontology name (one outside it would drop a positive without a word)."""
    lesions = record.get("lesions") or []
    if not isinstance(lesions, list):
        return f"'lesions' must be a list of objects, got a {type(lesions).__name__}"
    for i, les in enumerate(lesions, 1):
        name = les.get("diagnosis") if isinstance(les, dict) else None
        if not isinstance(les, dict) or name is None:   # keys only: its values may be free text
            what = f"keys {sorted(les)}" if isinstance(les, dict) else f"a {type(les).__name__}"
            return f"lesion {i} has no diagnosis ({what})"
        if name not in DIAGNOSES:
            near = difflib.get_close_matches(re.sub(r"\W+", "_", str(name).lower()), DIAGNOSES, n=1)
            return (f"lesion {i} diagnosis {name!r} is not an nvfm.ontology name"
                    + (f" (did you mean {near[0]!r}?)" if near else " (see nvfm/ontology.py)"))
    return None


def truth_diagnoses(record):
    """{name: side or None} for a findings.jsonl record: lesions' diagnosis/side plus any diagnosis
    named in its reference findings (e.g. ones without a lesion mask such as atrophy), by
    `nvfm.ontology.same_finding` name as `extract_diagnoses` gives them. A lesion
    without a diagnosis, or with one that is not an nvfm.ontology name, is a ValueError naming the
    study (it used to be dropped: a positive the metrics never saw)."""
    err = _lesion_error(record)
    if err:
        raise ValueError(f"study {record.get('study_key', record.get('study'))!r}: {err}")
    out = report_diagnoses(record.get("findings") or [])
    for les in record.get("lesions") or []:
        name, side = same_finding(les["diagnosis"]), les.get("side")
        side = side if side in ("left", "right", "bilateral") else None
        prev = out.get(name)
        if prev is None or prev == side:
            out[name] = side
        elif side is not None and prev is not None and prev != side:
            out[name] = "bilateral"
    return out


# ----------------------------------------------------------------------------- text metrics

def _wordnet():
    """NLTK WordNetCorpusReader over the Debian WordNet 3.0 files (no download)."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    src = os.environ.get("NVFM_WORDNET_DIR", WORDNET_SRC)
    need = [f for f in WordNetCorpusReader._FILES if f != "lexnames"]
    missing = [f for f in need if not os.path.exists(os.path.join(src, f))]
    if missing:
        raise RuntimeError(f"{src}: WordNet files {missing} missing; METEOR needs the Debian packages "
                           "wordnet-base and wordnet-sense-index (apt-get install wordnet-base wordnet-sense-index)")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nvfm",
                         "nltk_data", "corpora", "wordnet")
    os.makedirs(cache, exist_ok=True)
    for f in need:
        dst = os.path.join(cache, f)
        if not os.path.exists(dst) or os.path.getsize(dst) != os.path.getsize(os.path.join(src, f)):
            # copies, not symlinks: NLTK refuses to open files that resolve outside its corpus root
            shutil.copyfile(os.path.join(src, f), dst + ".tmp")
            os.replace(dst + ".tmp", dst)
    lex = os.path.join(cache, "lexnames")
    if not os.path.exists(lex):
        tmp = lex + f".tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            for i, n in enumerate(_LEXNAMES):
                fh.write(f"{i:02d}\t{n}\t{_POS_NUM[n.split('.')[0]]}\n")
        os.replace(tmp, lex)
    import warnings
    import nltk
    # NLTK only opens files under a folder of its data path
    root = os.path.dirname(os.path.dirname(cache))
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions not available": we need English only
        return WordNetCorpusReader(cache, None)


_WN = {}   # WordNet source dir -> reader


def wordnet_missing():
    """None when METEOR's WordNet can be read, else the reason (a sentence naming the packages)."""
    try:
        _get_wordnet()
    except RuntimeError as e:
        return str(e)
    return None


def _get_wordnet():
    src = os.environ.get("NVFM_WORDNET_DIR", WORDNET_SRC)
    if src not in _WN:
        _WN[src] = _wordnet()
    return _WN[src]


def _join(findings):
    """A report's text for the text metrics: its findings joined with spaces, NFKC-normalised (an
    'e' + U+0301 from one source and a composed 'é' from another are the same letter to all three)."""
    return unicodedata.normalize("NFKC", " ".join(f.strip() for f in findings if f.strip()))


def _words(pattern, text):
    """regex (an nltk and sacrebleu dependency), not re: its \\w holds the combining marks that
    Devanagari and other scripts write vowels with, re's splits words there ('हिंदी' -> 'ह', 'द')."""
    import regex
    return regex.findall(pattern, text)


def meteor_tokens(text):
    """METEOR's tokens: lower case, runs of letters/digits (with their combining marks) of any
    script and single punctuation marks (on ASCII text: [a-z0-9]+ runs and every other non-space
    character)."""
    return _words(r"[^\W_]+|[^\w\s]|_", text.lower())


class RougeTokenizer:
    """rouge-score's DefaultTokenizer(use_stemmer=True) for letters and digits of any script: lower
    case, runs of letters/digits (with their combining marks), Porter stems of tokens over 3
    characters. On ASCII text the same tokens as rouge-score's; that one drops every non-ASCII
    letter ('hämatom' -> 'h', 'matom')."""

    def __init__(self):
        from nltk.stem import porter
        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text):
        text = unicodedata.normalize("NFKC", text).lower()   # composed letters: 'e' + U+0301 is one letter
        return [self.stemmer.stem(t) if len(t) > 3 else t for t in _words(r"[^\W_]+", text)]


def text_metrics(hyps, refs):
    """hyps, refs: lists (studies) of finding lists -> {bleu2, rougeL, meteor} in [0, 1], plus
    n_text_pairs (studies scored) and n_both_empty.

    A study whose generated and reference reports are both empty (no positive finding, rightly
    reported as such) is left out of all three: scoring the placeholder text against itself would
    give it a perfect 1 and inflate the averages of cohorts with many normal studies (a correct
    empty report is credited by diagnosis_set_accuracy and triage_accuracy instead). An empty
    report facing a non-empty one is scored as the text "No positive findings.". With no study
    left the three are NaN. Without WordNet, METEOR is NaN and `meteor_note` says why; BLEU-2 and
    ROUGE-L are still computed."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hyps) != len(refs):   # zip would drop the unmatched studies without a word
        raise ValueError(f"{len(hyps)} generated reports for {len(refs)} references: one of each per study")
    pairs = [(_join(hh), _join(rr)) for hh, rr in zip(hyps, refs)]
    kept = [(hh or EMPTY_REPORT, rr or EMPTY_REPORT) for hh, rr in pairs if hh or rr]
    out = {"n_text_pairs": len(kept), "n_both_empty": len(pairs) - len(kept)}
    nan = float("nan")
    try:
        wn = _get_wordnet()
    except RuntimeError as e:
        wn = None
        out["meteor_note"] = f"METEOR not computed: {e}"
    if not kept:
        return {"bleu2": nan, "rougeL": nan, "meteor": nan, **out}
    h, r = [k[0] for k in kept], [k[1] for k in kept]
    bleu = sacrebleu.metrics.BLEU(max_ngram_order=2, effective_order=False).corpus_score(h, [r]).score / 100
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=RougeTokenizer())
    rouge = sum(scorer.score(rr, hh)["rougeL"].fmeasure for hh, rr in kept) / len(kept)
    meteor = nan
    if wn is not None:
        from nltk.translate.meteor_score import meteor_score
        meteor = sum(meteor_score([meteor_tokens(rr)], meteor_tokens(hh), wordnet=wn) for hh, rr in kept) / len(kept)
    return {"bleu2": bleu, "rougeL": rouge, "meteor": meteor, **out}


# ----------------------------------------------------------------------------- triage judges

def judge_rules(findings, indication=None):
    """Triage from the diagnoses named in the findings (nvfm.ontology.triage); indication unused."""
    return triage(list(report_diagnoses(findings)))


JUDGE_SYSTEM = ("You triage brain imaging reports. Answer with exactly one word: unremarkable (no positive "
                "finding), routine (positive findings, none needing same-day action) or urgent (a finding "
                "needing same-day action such as acute hemorrhage, acute infarct, herniation or mass effect, "
                "obstructive hydrocephalus, infection or an unstable fracture).")


def judge_http(findings, indication=None, url="http://127.0.0.1:8080/v1", model="local", timeout=60, api_key=None):
    """Triage by an OpenAI-compatible chat endpoint (POST {url}/chat/completions); raises on errors."""
    body = {"model": model, "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": f"Indication: {indication or 'not given'}\nFindings: {json.dumps(list(findings))}"}]}
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        reply = json.load(resp)["choices"][0]["message"]["content"].lower()
    # whole words ("non-urgent" is not "urgent"), none negating ("not urgent"): read otherwise, it is the opposite
    words = re.findall(r"[a-z]+(?:-[a-z]+)*", reply)
    hits = sorted({w for w in words if w in TRIAGE_CLASSES})
    if len(hits) != 1 or any(w in ("no", "not", "non") for w in words):
        # counted, not quoted: the reply may repeat the report's free text
        raise ValueError(f"judge at {url} did not answer exactly one of {TRIAGE_CLASSES}, not negated (its reply: "
                         f"{len(words)} word(s), naming {hits or 'none'})")
    return hits[0]


# ----------------------------------------------------------------------------- evaluation

def iter_jsonl(path, what):
    """(line number, record) for every non-blank line of a JSONL file; a line that is not JSON
    is a ValueError naming the file, the line and what the file is (`what`)."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}) in the {what} file") from None
            yield i, row


def _study_key(row, path, line, keys=("study_key", "study", "study_uid"), hint=""):
    """A JSONL record's study: the value of the first of `keys` it has. ValueError naming the file
    and line for a line that is not a JSON object, a record with none of `keys` (`hint` appended) or
    a study that is not a string or a whole number (a null, a list: it could not be matched)."""
    name = next((n for n in keys if isinstance(row, dict) and n in row), None)
    if name is None:
        what = "" if isinstance(row, dict) else f" (the line is a JSON {type(row).__name__}, not an object)"
        raise ValueError(f"{path}:{line}: no {keys[0]}{what}{hint}")
    k = row[name]
    if not isinstance(k, (str, int)) or isinstance(k, bool):   # named by type only: it may be free text
        raise ValueError(f"{path}:{line}: {name} must be a string or a whole number, got a {type(k).__name__}")
    return k


# the MR ontology dates no subdural hematoma: in an MR study the CT's dated names are that one finding
MR_FOLD = {"acute_subdural_hematoma": "subdural_hematoma", "subacute_chronic_subdural_hematoma": "subdural_hematoma"}


def in_modality(dx, modality):
    """{name: side} as scored in a study of `modality`: for MR, MR_FOLD's names merged (sides as
    report_diagnoses merges them); otherwise dx itself."""
    if str(modality or "").upper() != "MR":
        return dx
    out = {}
    for name, side in dx.items():
        _merge_side(out, MR_FOLD.get(name, name), side)
    return out


def _truth_triage(record):
    """Triage of a findings.jsonl record that gives none: nvfm.ontology.triage of the diagnoses its
    findings text names as written, as the rule judge reads a report (an MR "chronic subdural
    hematoma" is routine, not the MR ontology's urgent subdural_hematoma it is scored as), plus those
    of its lesions whose finding the text does not name (an MR subdural_hematoma lesion is the text's
    dated one). Its lesions are checked (`truth_diagnoses`) before."""
    modality, text = record.get("modality"), report_diagnoses(record.get("findings") or [])
    named = set(in_modality(text, modality))
    lesions = {same_finding(les["diagnosis"]) for les in record.get("lesions") or []}
    return triage(sorted(set(text) | {n for n in lesions if not set(in_modality({n: None}, modality)) & named}))


def evaluate_report_lists(hyps, truths, indications=None, judge="rules", judge_url=None, judge_model="local"):
    """hyps: list of finding lists; truths: the matching findings.jsonl records -> metrics dict."""
    n = len(hyps)
    if len(truths) != n or (indications and len(indications) != n):   # every rate divides by n
        raise ValueError(f"{n} generated reports for {len(truths)} ground-truth records"
                         + (f" and {len(indications)} indications" if indications else "") + ": one of each per study")
    out = {"n_studies": n}
    out.update(text_metrics(hyps, [t.get("findings") or [] for t in truths]))
    mentioned = hall = pos = omit = upos = uomit = lat_n = lat_err = 0
    correct, confusion = 0, {a: {b: 0 for b in TRIAGE_CLASSES} for a in TRIAGE_CLASSES}
    dx_exact = dx_f1 = 0.0
    for i, (h, t) in enumerate(zip(hyps, truths)):
        gen, gt = in_modality(report_diagnoses(h), t.get("modality")), in_modality(truth_diagnoses(t), t.get("modality"))
        dx_exact += set(gen) == set(gt)
        dx_f1 += 2 * len(set(gen) & set(gt)) / (len(gen) + len(gt)) if gen or gt else 1.0
        mentioned += len(gen)
        hall += sum(d not in gt for d in gen)
        pos += len(gt)
        omit += sum(d not in gen for d in gt)
        urgent = [d for d in gt if DIAGNOSES[d].urgency == "urgent"]
        upos += len(urgent)
        uomit += sum(d not in gen for d in urgent)
        for d, side in gen.items():
            if d in gt and gt[d] in ("left", "right") and side is not None:
                lat_n += 1
                lat_err += side != gt[d]
        ind = (indications[i] if indications else None) or t.get("indication")
        pred = judge_rules(h, ind) if judge == "rules" else judge_http(h, ind, url=judge_url, model=judge_model)
        true = t.get("triage")
        true = _truth_triage(t) if true is None or str(true).strip() == "" else str(true).strip().lower()
        if true not in TRIAGE_CLASSES:
            raise ValueError(f"study {t.get('study_key', i)!r}: triage {t.get('triage')!r} is not one of "
                             f"{TRIAGE_CLASSES} (case is ignored)")
        confusion[true][pred] += 1
        correct += pred == true
    rate = lambda a, b: a / b if b else float("nan")
    out.update(triage_accuracy=rate(correct, n), triage_confusion=confusion, judge=judge,
               hallucination_rate=rate(hall, mentioned), omission_rate=rate(omit, pos),
               urgent_omission_rate=rate(uomit, upos), laterality_error_rate=rate(lat_err, lat_n),
               diagnosis_set_accuracy=rate(dx_exact, n), diagnosis_f1=rate(dx_f1, n),
               n_mentioned=mentioned, n_positive=pos, n_urgent_positive=upos, n_sided=lat_n)
    return out


def check_findings(f, path, line, key):
    """A report's findings must be a list of strings: a string would be scored letter by letter
    (iterating it), a null as the text 'None'."""
    if not isinstance(f, list) or not all(isinstance(x, str) for x in f):
        # named by type only: the value is report free text, which may hold patient identifiers
        got = (f"a list holding {sorted({type(x).__name__ for x in f if not isinstance(x, str)})}"
               if isinstance(f, list) else f"a {type(f).__name__}")
        raise ValueError(f"{path}:{line}: study {key!r}: 'findings' must be a list of strings, got {got}")


def read_truth(path, keys=("study_key", "study", "study_uid"), hint=""):
    """({study: record}, {study: line number}) of a ground-truth findings.jsonl, a record's study
    named by the first of `keys` it has. ValueError naming the file and line for a line that is not
    a JSON object, a record with none of `keys` (`hint` appended) or a study that is not a string or
    whole number (`_study_key`), a study twice, or 'findings' that is not a list of strings (absent
    or null: no finding)."""
    truth, lines = {}, {}
    for line, r in iter_jsonl(path, "findings"):
        k = _study_key(r, path, line, keys, hint)
        if k in truth:
            raise ValueError(f"{path}:{line}: study {k!r} appears twice in the ground truth (line {lines[k]} too)")
        if r.get("findings") is not None:   # absent or null: no positive finding
            check_findings(r["findings"], path, line, k)
        truth[k], lines[k] = r, line
    return truth, lines


def evaluate_reports(reports_jsonl, findings_jsonl, judge="rules", judge_url=None, judge_model="local",
                     splits=None):
    """Score generated reports against the reference findings.

    reports_jsonl: one {"study_key", "findings": [str, ...]} per line (train_llava.py writes these,
    plus "raw" text and "parse" status, counted into parse_ok_rate). findings_jsonl: the
    SHARDS/findings.jsonl ground truth. A report of a study that is not in the ground truth is an
    error; extra ground-truth studies are ignored. splits (a collection of split names, e.g.
    {"test"}; None = every report): only the reports of studies whose ground-truth record has one
    of these splits are scored (the others are counted in n_other_split, and `split` names the
    scored ones); a study of those splits without a report is an error, as is a ground truth with
    no study of them. 'findings' that is not a list of strings (in either file; absent or null in
    the ground truth means none), and a scored study's lesion whose diagnosis is missing or not an
    nvfm.ontology name, are errors naming the file and line. Returns the metrics dict (see the module docstring).
    """
    reps, seen = [], {}
    for line, r in iter_jsonl(reports_jsonl, "reports"):
        k = _study_key(r, reports_jsonl, line)
        if k in seen:   # a study counted twice would weigh twice in every rate
            raise ValueError(f"{reports_jsonl}:{line}: study {k!r} already has a report (line {seen[k]}); "
                             "keep one report per study")
        seen[k] = line
        check_findings(r.get("findings"), reports_jsonl, line, k)
        reps.append((k, r))
    truth, lines = read_truth(findings_jsonl)
    for k, r in reps:
        if k not in truth:
            raise ValueError(f"{reports_jsonl}: study {k!r} is not in {findings_jsonl}")
    n_other = 0
    if splits is not None:
        splits = sorted(set(splits))
        name = "/".join(splits)
        want = [k for k, t in truth.items() if t.get("split") in splits]
        if not want:
            have = sorted({str(t["split"]) for t in truth.values() if t.get("split") is not None})
            raise ValueError(f"{findings_jsonl}: no study of split {name} "
                             + (f"(its splits: {', '.join(have)})" if have else "(its records have no 'split')"))
        lost = [k for k in want if k not in seen]
        if lost:   # a partial split would be reported as the split's figures
            raise ValueError(f"{reports_jsonl}: {len(lost)} of the {len(want)} {name} studies of {findings_jsonl} have "
                             f"no report (first: {lost[:3]}): generate a report for every one (train_llava.py "
                             "--max_eval=0) or choose another --split")
        kept = [(k, r) for k, r in reps if truth[k].get("split") in splits]
        n_other, reps = len(reps) - len(kept), kept
    hyps, truths = [], []
    for k, r in reps:
        err = _lesion_error(truth[k])
        if err:
            raise ValueError(f"{findings_jsonl}:{lines[k]}: study {k!r}: {err}")
        hyps.append(list(r["findings"]))
        truths.append(truth[k])
    if not reps:
        raise ValueError(f"{reports_jsonl}: no reports")
    out = evaluate_report_lists(hyps, truths, judge=judge, judge_url=judge_url, judge_model=judge_model)
    if splits is not None:
        out.update(split=name, n_other_split=n_other)
    status = [r.get("parse") for _, r in reps if "parse" in r]
    if status:
        out["parse_ok_rate"] = sum(s == "ok" for s in status) / len(status)
    return out
