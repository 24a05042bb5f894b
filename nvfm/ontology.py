"""Diagnostic ontology of the paper (UM-NeuroBench), shared by the demo cohort and the probes.

The names are the paper's label keys, verbatim: 82 CT diagnoses (Supplementary Data Fig. 5)
and 74 MRI diagnoses (Supplementary Data Fig. 3). Each name carries:
  modalities  which ontologies list it ("CT", "MR" or both)
  urgency     "urgent" (needs same-day action: acute blood, acute infarct, herniation/mass
              effect, obstructive hydrocephalus, infection, unstable fracture, vascular
              emergencies) or "routine" (everything else)
  lateral     whether a finding of this kind has a side (left/right/bilateral)

Triage rule used by the demo cohort (and documented in its README):
  unremarkable  no positive diagnosis
  urgent        at least one positive diagnosis with urgency "urgent"
  routine       otherwise
"""
from dataclasses import dataclass

CT_DIAGNOSES = [
    'acute_subdural_hematoma', 'subacute_chronic_subdural_hematoma', 'epidural_hematoma',
    'brain_contusion', 'displaced_skull_fracture', 'nondisplaced_skull_fracture',
    'skull_base_fracture', 'orbital_trauma', 'orbital_emphysema', 'pneumocephalus',
    'diffuse_axonal_injury', 'craniofacial_injury', 'intracranial_hemorrhage',
    'intraparenchymal_hemorrhage', 'aneurysmal_subarachnoid_hemorrhage',
    'traumatic_subarachnoid_hemorrhage', 'intraventricular_hemorrhage',
    'scalp_hemorrhage_hematoma', 'acute_ischemic_stroke', 'small_vessel_ischemic_disease',
    'large_vessel_occlusion', 'intracranial_atherosclerosis', 'arterial_dissection',
    'carotid_cavernous_fistula', 'cerebral_venous_sinus_thrombosis', 'intracranial_aneurysm',
    'cavernous_malformation_cavernoma', 'cerebral_arteriovenous_malformation',
    'intra_axial_brain_tumor', 'extra_axial_brain_tumor', 'orbital_tumor', 'pineal_tumor',
    'pituitary_tumor', 'skull_bone_tumor', 'posterior_fossa_tumors', 'head_neck_tumor',
    'spine_tumor', 'spinal_degenerative_changes', 'arachnoid_cyst',
    'intracranial_epidermoid_dermoid_cyst', 'colloid_cyst', 'cerebral_subdural_empyema',
    'cerebral_abscess', 'craniotomy', 'cranioplasty_implant', 'burr_hole', 'resection_cavity',
    'postsurgical_changes', 'catheter', 'intracranial_pressure_monitor', 'brain_lead',
    'aneurysm_coil', 'aneurysm_clip', 'embolization_material', 'cerebral_foreign_body',
    'ventriculomegaly', 'obstructive_hydrocephalus', 'transependymal_flow',
    'subdural_hygroma_effusions', 'slit_ventricle', 'intracranial_hypotension',
    'cerebral_edema', 'cerebral_atrophy', 'brain_herniation', 'brain_mass_effect',
    'midline_shift', 'encephalomalacia_gliosis', 'basal_ganglia_calcification',
    'chiari_malformation', 'dysgenesis_corpus_callosum', 'dandy_walker_malformation',
    'mega_cisterna_magna', 'sinusitis', 'mastoid_effusion', 'otitis_media',
    'peritonsillar_abscess', 'pharyngeal_abscess', 'cholesteatoma',
    'head_neck_enlarged_lymph_node', 'airway_obstruction', 'thyroid_nodule',
    'parathyroid_nodule',
]

MR_DIAGNOSES = [
    'subdural_hematoma', 'epidural_hematoma', 'brain_contusion', 'diffuse_axonal_injury',
    'cerebral_aneurysm', 'arteriovenous_malformation', 'cavernous_malformation_cavernoma',
    'venous_sinus_thrombosis', 'acute_ischemic_stroke', 'chronic_ischemic_stroke',
    'moya_moya_disease', 'small_vessel_ischemic_disease', 'lacunar_stroke',
    'intracranial_hemorrhage', 'intraparenchymal_hemorrhage', 'intraventricular_hemorrhage',
    'aneurysmal_subarachnoid_hemorrhage', 'traumatic_subarachnoid_hemorrhage',
    'multiple_sclerosis', 'neuromyelitis_optica', 'neurosarcoidosis', 'brain_abscess',
    'viral_encephalitis', 'arachnoid_cyst', 'pineal_cyst', 'epidermoid_cyst', 'colloid_cyst',
    'brain_tumor', 'orbital_tumor', 'head_neck_tumor', 'spine_tumor', 'nerve_tumor',
    'spinal_degenerative_changes', 'glioma', 'high_grade_glioma', 'low_grade_glioma',
    'brain_metastasis', 'meningioma', 'schwannoma', 'lymphoma', 'pineal_tumor',
    'intraventricular_tumor', 'pediatric_posterior_fossa_tumor', 'brainstem_glioma',
    'pituitary_tumor', 'rathkes_cleft_cyst', 'craniopharyngioma', 'chordoma_chondrosarcoma',
    'chiari_malformation', 'cerebral_atrophy', 'brain_herniation', 'brain_mass_effect',
    'brain_midline_shift', 'cephaloceles', 'encephalomalacia_gliosis', 'cerebral_edema',
    'cavum_septum_pellucidum', 'dandy_walker_malformation', 'mega_cisterna_magna',
    'heterotopia', 'pachygyria_lissencephaly', 'schizencephaly', 'dysgenesis_corpus_callosum',
    'ventriculomegaly', 'hydrocephalus_ex_vacuo', 'obstructive_hydrocephalus',
    'subdural_hygroma_effusions', 'intracranial_hypotension', 'craniotomy_craniectomy',
    'tumor_resection_cavity', 'postsurgical_changes', 'pneumocephalus', 'catheter',
    'spine_syrinx',
]

# same-day action needed; everything else is routine (see module docstring)
URGENT = {
    'acute_subdural_hematoma', 'subdural_hematoma', 'epidural_hematoma', 'brain_contusion',
    'displaced_skull_fracture', 'skull_base_fracture', 'orbital_trauma', 'pneumocephalus',
    'diffuse_axonal_injury', 'intracranial_hemorrhage', 'intraparenchymal_hemorrhage',
    'aneurysmal_subarachnoid_hemorrhage', 'traumatic_subarachnoid_hemorrhage',
    'intraventricular_hemorrhage', 'acute_ischemic_stroke', 'large_vessel_occlusion',
    'arterial_dissection', 'carotid_cavernous_fistula', 'cerebral_venous_sinus_thrombosis',
    'venous_sinus_thrombosis', 'cerebral_subdural_empyema', 'cerebral_abscess', 'brain_abscess',
    'viral_encephalitis', 'obstructive_hydrocephalus', 'transependymal_flow', 'cerebral_edema',
    'brain_herniation', 'brain_mass_effect', 'midline_shift', 'brain_midline_shift',
    'peritonsillar_abscess', 'pharyngeal_abscess', 'airway_obstruction',
}

# findings without a side: diffuse, midline or whole-brain processes
NON_LATERAL = {
    'diffuse_axonal_injury', 'intracranial_hemorrhage', 'intraventricular_hemorrhage',
    'small_vessel_ischemic_disease', 'intracranial_atherosclerosis', 'pineal_tumor',
    'pituitary_tumor', 'spine_tumor', 'spinal_degenerative_changes', 'colloid_cyst',
    'ventriculomegaly', 'obstructive_hydrocephalus', 'transependymal_flow', 'slit_ventricle',
    'intracranial_hypotension', 'cerebral_atrophy', 'basal_ganglia_calcification',
    'chiari_malformation', 'dysgenesis_corpus_callosum', 'dandy_walker_malformation',
    'mega_cisterna_magna', 'airway_obstruction', 'multiple_sclerosis', 'neuromyelitis_optica',
    'neurosarcoidosis', 'pineal_cyst', 'brainstem_glioma', 'rathkes_cleft_cyst',
    'craniopharyngioma', 'chordoma_chondrosarcoma', 'cavum_septum_pellucidum', 'heterotopia',
    'pachygyria_lissencephaly', 'hydrocephalus_ex_vacuo', 'spine_syrinx', 'moya_moya_disease',
    'intraventricular_tumor', 'pediatric_posterior_fossa_tumor', 'cephaloceles',
}


# MR label -> the CT label of the same finding: the two ontologies name some findings differently,
# and a report's words ("midline shift", "epidermoid cyst") can name only one of them
SAME_FINDING = {
    'brain_midline_shift': 'midline_shift',
    'arteriovenous_malformation': 'cerebral_arteriovenous_malformation',
    'venous_sinus_thrombosis': 'cerebral_venous_sinus_thrombosis',
    'cerebral_aneurysm': 'intracranial_aneurysm',
    'brain_abscess': 'cerebral_abscess',
    'epidermoid_cyst': 'intracranial_epidermoid_dermoid_cyst',
    'craniotomy_craniectomy': 'craniotomy',
    'tumor_resection_cavity': 'resection_cavity',
}


def same_finding(name):
    """The one name that report metrics compare a diagnosis by: its CT name where the MR ontology
    names the same finding otherwise (SAME_FINDING), else the name itself."""
    return SAME_FINDING.get(name, name)


@dataclass(frozen=True)
class Diagnosis:
    name: str
    modalities: frozenset   # subset of {"CT", "MR"}
    urgency: str            # "urgent" | "routine"
    lateral: bool           # has a side (left / right / bilateral)


def _build():
    out = {}
    for name in CT_DIAGNOSES + [n for n in MR_DIAGNOSES if n not in CT_DIAGNOSES]:
        mods = frozenset(m for m, lst in (("CT", CT_DIAGNOSES), ("MR", MR_DIAGNOSES)) if name in lst)
        out[name] = Diagnosis(name, mods, "urgent" if name in URGENT else "routine",
                              name not in NON_LATERAL)
    return out


DIAGNOSES = _build()             # name -> Diagnosis, CT order first, then MR-only names
ALL_DIAGNOSES = list(DIAGNOSES)  # the labels.csv column order


def diagnoses_for(modality):
    """Ontology label names for one modality ("CT" or "MR"), in the paper's order."""
    if modality == "CT":
        return list(CT_DIAGNOSES)
    if modality in ("MR", "MRI"):
        return list(MR_DIAGNOSES)
    raise ValueError(f"unknown modality {modality!r}: expected 'CT' or 'MR'")


def triage(positive_names):
    """Triage level from positive diagnosis names: 'unremarkable' | 'routine' | 'urgent'."""
    names = [n for n in positive_names]
    for n in names:
        if n not in DIAGNOSES:
            raise ValueError(f"unknown diagnosis {n!r}")
    if not names:
        return "unremarkable"
    return "urgent" if any(DIAGNOSES[n].urgency == "urgent" for n in names) else "routine"


assert len(CT_DIAGNOSES) == 82 and len(MR_DIAGNOSES) == 74
assert all(m in MR_DIAGNOSES and c in CT_DIAGNOSES and DIAGNOSES[m].urgency == DIAGNOSES[c].urgency
           and DIAGNOSES[m].lateral == DIAGNOSES[c].lateral for m, c in SAME_FINDING.items())
