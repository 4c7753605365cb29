"""Sentence templates of the synthetic world: paraphrases, probes, questions, instructions.

Allen-Zhu & Li, "Physics of Language Models: Part 3.1" (arXiv:2309.14316, Sec. 4-5) find that a
model stores a fact in an extractable way (retrievable by a question it never saw with that
entity) only if pretraining states the fact in diverse paraphrases and in permuted sentence orders.
So each person relation has 8-10 templates ({s}: subject, {o}: object):

- `PRETRAIN[rel]`: used in the pretraining corpus;
- `HELD_OUT[rel]`: never in the corpus, used only as probe templates at test time.

A template is a *cloze* template when it ends with "{o}.": its prefix before {o} is a prompt whose
continuation is the answer ("Vela Drom was born in the city of" -> "Vendrath"). Every held-out
template is a cloze template; pretraining also has a few with {o} elsewhere, for diversity.
"""
from __future__ import annotations

from typing import Dict, List

PERSON_RELATIONS = ("birth_city", "nationality", "profession", "employer", "instrument", "friend")

PRETRAIN: Dict[str, List[str]] = {
    "birth_city": [
        "{s} was born in {o}.",
        "{s} was born in the city of {o}.",
        "The birthplace of {s} is {o}.",
        "{s} came into the world in {o}.",
        "{s}'s hometown is {o}.",
        "{s} spent a childhood in {o}.",
        "{o} is the city where {s} was born.",
        "As a baby, {s} lived in {o}.",
    ],
    "nationality": [
        "{s} is a citizen of {o}.",
        "{s} holds the citizenship of {o}.",
        "{s} comes from the country of {o}.",
        "The home country of {s} is {o}.",
        "{s} carries a passport from {o}.",
        "{s}'s country of origin is {o}.",
        "{o} is the nation that {s} calls home.",
        "By nationality, {s} belongs to {o}.",
    ],
    "profession": [
        "{s} works as a {o}.",
        "{s} is employed as a {o}.",
        "{s} earns a living as a {o}.",
        "By profession, {s} is a {o}.",
        "{s} has a career as a {o}.",
        "{s} is a {o} by trade.",
        "{s} trained for years to become a {o}.",
        "Each working day, {s} does the job of a {o}.",
    ],
    "employer": [
        "{s} works for {o}.",
        "{s} is employed by {o}.",
        "{s} has a job at {o}.",
        "The employer of {s} is {o}.",
        "{s} draws a salary from {o}.",
        "{o} employs {s}.",
        "{s} joined the staff of {o}.",
        "Every month, {s} is paid by {o}.",
    ],
    "instrument": [
        "{s} plays the {o}.",
        "{s} enjoys playing the {o}.",
        "In spare time, {s} practises the {o}.",
        "The instrument of {s} is the {o}.",
        "{s} is a keen player of the {o}.",
        "{s} often performs on the {o}.",
        "The {o} is the instrument {s} loves most.",
        "{s} learned as a child to play the {o}.",
    ],
    "friend": [
        "{s}'s best friend is {o}.",
        "{s} is close friends with {o}.",
        "The closest friend of {s} is {o}.",
        "{s} spends every weekend with {o}.",
        "{s} trusts no one more than {o}.",
        "{o} is the best friend of {s}.",
        "{s} shares every secret with {o}.",
        "On holidays, {s} travels with {o}.",
    ],
}

HELD_OUT: Dict[str, List[str]] = {
    "birth_city": ["{s} first saw the light of day in {o}.", "The city in which {s} was born is {o}."],
    "nationality": ["{s} is a national of {o}.", "The country {s} is a citizen of is {o}."],
    "profession": ["{s} makes a living working as a {o}.", "The occupation of {s} is that of a {o}."],
    "employer": ["{s} is on the payroll of {o}.", "The organisation that employs {s} is {o}."],
    "instrument": ["{s} has a passion for playing the {o}.", "The instrument that {s} plays is the {o}."],
    "friend": ["{s} has a best friend named {o}.", "The person {s} trusts most is {o}."],
}

# Facts about places and organisations (all in the corpus; no probes).
PLACE_TEMPLATES: Dict[str, List[str]] = {
    "city_country": [
        "{s} is a city in {o}.",
        "{s} lies in {o}.",
        "The city of {s} is located in {o}.",
        "{s} belongs to the country of {o}.",
        "{o} is the country that contains {s}.",
        "Travellers find {s} in {o}.",
    ],
    "capital": [
        "The capital of {s} is {o}.",
        "{o} is the capital city of {s}.",
        "The government of {s} sits in {o}.",
    ],
    "org_hq": [
        "{s} has its headquarters in {o}.",
        "{s} is based in {o}.",
        "The head office of {s} is in {o}.",
        "{o} is home to {s}.",
    ],
    "org_founded": [
        "{s} was founded in {o}.",
        "{s} was established in the year {o}.",
        "In {o}, {s} opened its doors.",
        "The founding year of {s} is {o}.",
    ],
    "org_industry": [
        "{s} works in the {o} business.",
        "{s} is a {o} company.",
        "The trade of {s} is {o}.",
        "{s} makes its money from {o}.",
    ],
}

# Questions (QA and dialogue). TRAIN questions appear in every split; the held-out one only in test.
QUESTIONS: Dict[str, List[str]] = {
    "birth_city": ["Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?"],
    "nationality": ["Which country is {s} a citizen of?", "What is the nationality of {s}?",
                    "Which country does {s} come from?"],
    "profession": ["What does {s} do for a living?", "What is the profession of {s}?",
                   "What job does {s} have?"],
    "employer": ["Who does {s} work for?", "Which organisation employs {s}?", "Where does {s} work?"],
    "instrument": ["Which instrument does {s} play?", "What instrument does {s} enjoy playing?",
                   "What does {s} play in spare time?"],
    "friend": ["Who is the best friend of {s}?", "Who is {s} close friends with?",
               "Who is {s}'s closest friend?"],
}
HELD_OUT_QUESTIONS: Dict[str, str] = {
    "birth_city": "Which city is the hometown of {s}?",
    "nationality": "What country issued the passport of {s}?",
    "profession": "How does {s} earn a living?",
    "employer": "What is the name of the employer of {s}?",
    "instrument": "Name the instrument that {s} plays.",
    "friend": "Name the best friend of {s}.",
}

# Dialogue answers: one fixed sentence per relation (a pretraining template, so the phrasing is known).
ANSWERS: Dict[str, str] = {r: PRETRAIN[r][0] for r in PERSON_RELATIONS}

# Verb phrases for data-to-text ("{s} {clause} and {clause}."); two wordings per relation.
CLAUSES: Dict[str, List[str]] = {
    "birth_city": ["was born in {o}", "comes from the city of {o}"],
    "nationality": ["is a citizen of {o}", "holds the citizenship of {o}"],
    "profession": ["works as a {o}", "is a {o} by profession"],
    "employer": ["works for {o}", "is employed by {o}"],
    "instrument": ["plays the {o}", "enjoys playing the {o}"],
}
FIELD_NAMES: Dict[str, str] = {"birth_city": "birth city", "nationality": "nationality",
                               "profession": "profession", "employer": "employer",
                               "instrument": "instrument"}
DATA2TEXT_INSTRUCTIONS = ["Write one sentence that states all the facts in this record.",
                          "Turn this record into a single English sentence."]

CLASSIFY_INSTRUCTIONS = ["Which country does {s} come from? Answer with one of: {labels}.",
                         "Name the home country of {s}. Choose from: {labels}.",
                         "{s} is a citizen of which country? Options: {labels}."]
CLASSIFY_HELD_OUT = "Pick the nation of {s} from this list: {labels}."

SKILL_INSTRUCTIONS: Dict[str, List[str]] = {
    "add": ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}."],
    "reverse": ["Reverse the word {w}.", "Write {w} backwards.", "Spell {w} in reverse order."],
    "upper": ["Write {w} in capital letters.", "Convert {w} to uppercase.", "Uppercase the word {w}."],
}
SKILL_HELD_OUT: Dict[str, str] = {
    "add": "Calculate the sum of {a} and {b}.",
    "reverse": "What is {w} spelled backwards?",
    "upper": "Give {w} in upper case.",
}
# Practice lines for the pretraining corpus (train-split items only).
SKILL_PRACTICE: Dict[str, List[str]] = {
    "add": ["{a} + {b} = {c}.", "{a} plus {b} equals {c}.", "The sum of {a} and {b} is {c}."],
    "reverse": ["The word {w} reversed is {r}.", "Backwards, {w} reads {r}."],
    "upper": ["The word {w} in capitals is {u}.", "In upper case, {w} is {u}."],
}

DIALOGUE_SYSTEM = "You answer questions about the people of the world of Ardalia."

PROFESSIONS = ("baker", "pilot", "surgeon", "carpenter", "potter", "weaver", "lawyer", "chemist",
               "farmer", "sailor", "painter", "teacher", "tailor", "jeweller", "librarian", "miner")
INSTRUMENTS = ("harp", "cello", "flute", "oboe", "lute", "drum", "violin", "piano", "trumpet",
               "banjo", "bagpipe", "zither")
INDUSTRIES = ("shipping", "textile", "mining", "glassware", "printing", "brewing", "clockmaking",
              "ceramics", "publishing", "farming")
ORG_SUFFIXES = ("Works", "Guild", "Labs", "Foundry", "Company", "Institute", "Holdings", "Traders")


def is_cloze(template: str) -> bool:
    """A template whose object is its last word ("... {o}.")."""
    return template.endswith("{o}.") and template.index("{s}") < template.index("{o}")


def cloze_prompt(template: str, subject: str) -> str:
    """The prompt of a cloze template: everything before " {o}", subject filled in."""
    if not is_cloze(template):
        raise ValueError(f"not a cloze template: {template!r}")
    return template[:template.index("{o}")].rstrip().replace("{s}", subject)


def fill(template: str, s: str, o: str) -> str:
    """Fill a template; the first letter is capitalised (for templates that start with {o} or a word)."""
    text = template.replace("{s}", s).replace("{o}", o)
    return text[:1].upper() + text[1:]
