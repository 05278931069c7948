"""A capability spec: copy this file, fill in what differs, and pass its path wherever a capability is asked for.

  python -m bar_jax.train --config=configs/branch.py --config.capability=path/to/my_spec.py --workdir=runs/b_mine
  python -m bar_jax.train --config=configs/evaluate.py --config.domains=math,path/to/my_spec.py ...

A spec's get_config() returns a dict (or ConfigDict) with the fields below; fields left out take the defaults shown
here (this file's get_config() IS the defaults), an unknown field is refused. Relative file paths are read from the
spec file's folder. Every data problem stops with one line naming the file and line or row.

name          the capability's name: the expert's name in the MoE and the eval table's column. One word.
description   one line for people: what the capability teaches.
license       where the data comes from and under which license (recorded in every manifest made from it).

data          the SFT data.
  source        a built-in source instead of files: reasoning_gym | stdlib_functions | bfcl | harmful_and_benign |
                python_docs (bar_jax/data/domains.py). Leave "" for your own files.
  files         list of JSONL / JSON / Parquet / CSV files, or of folders written by `datasets`' save_to_disk; read
                offline with the Hugging Face `datasets` library.
  split         the split to read from a saved DatasetDict folder ("train").
  messages      the field holding a list of {"role", "content"} turns (system first if any, then user and assistant
                alternating, ending with the assistant's answer: the loss is on assistant turns). Set "" to use
  prompt        the field with the user's prompt and
  response      the field with the answer, instead.
  system        a field with a per-example system prompt, or
  system_prompt one fixed system prompt for every example ("" = none).
  reference     the field the metric and the reward compare with (default "": the final answer itself, e.g. a
                GSM8K solution ending in "#### 72" whose number the exact_match extractor finds).
  group         a field naming sub-sources: eval items are interleaved across them (the first n are stratified)
                and rl.groups can pick some.
  choices       metric "choice" only: the field holding the list of options; reference = index or correct text.
  refuse        metric "refusal" only: a true/false field, true = the prompt must be refused.

text          optional mid-training text (phase midtrain).
  files         files with a text field (JSONL / JSON / Parquet / CSV / saved folder) or plain .txt files; [] = the
                SFT conversations as text.
  field         the text field ("text").

eval          the held-out set.
  files         a separate eval file (same mapping as data); [] = hold out a fraction of data.files instead.
  heldout_pct   percent held out, chosen by the hash of the normalised prompt text (lower case, punctuation and
                spaces folded), so two copies of a prompt always land on the same side.
  on_overlap    eval.files items whose normalised prompt also occurs in training: "drop" (counted in the
                capability's report) or "refuse" (stop with one line).

metric        one of the menu (bar_jax/evals/menu.py), as a dict: {"name": ..., options}:
                exact_match  {extractor: "answer" | "last_number" | a regex whose first group is the answer}
                numeric      {extractor, tolerance: relative to max(1, |reference|)}
                choice       multiple choice by log-likelihood (needs data.choices)
                call_match   BFCL function-call match (reference: {name: {arg: [accepted values]}}, dict or JSON)
                call_greedy  the same reference, scored without decoding: teacher-forced greedy match of its
                             canonical call, plus the call's NLL (RL reward: call_match)
                refusal      refuse harmful / answer benign (needs data.refuse)
                nll          per-token NLL of the reference answer (lower is better)
                verifier     {verifier: "package.module:function"} (response, reference) -> a score in [0, 1]
reward        the RL reward: "" = the metric's own score (generative metrics), or "package.module:function" with
              the verifier signature. A verifier that raises or returns something outside [0, 1] scores 0 on that
              item and is counted (the run goes on; the count is in the manifest).
rl            groups: RL prompts only from these data.group values ([] = all).
general       the general-data mix of every branch phase:
  weight        share of general data (0.25; 0 = none).
  capability    the capability mixed in as general data ("general", the Python docs; or your own spec's path).
"""


def get_config():
  return dict(
      name="",
      description="",
      license="",
      data=dict(source="", files=[], split="train", messages="messages", prompt="", response="", system="",
                system_prompt="", reference="", group="", choices="", refuse=""),
      text=dict(files=[], field="text"),
      eval=dict(files=[], heldout_pct=5, on_overlap="drop"),
      metric=dict(name="exact_match", extractor="answer"),
      reward="",
      rl=dict(groups=[]),
      general=dict(weight=0.25, capability="general"),
  )
