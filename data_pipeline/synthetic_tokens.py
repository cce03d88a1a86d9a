"""A built-in token source that needs no download: seeded Markov-chain documents.

A fixed, seeded transition table gives every token `branching` possible successors. Documents
are `<eos>` then a random walk of random length. A model that learns drives the loss from
log(vocab) down towards the chain's entropy (`entropy_per_token`), a clear signal in a few hundred
CPU steps. It feeds the trainer through the same packing and batch format as the real
multimodal pipeline.
"""
from __future__ import annotations

import grain
import numpy as np

EOS_ID = 1
FIRST_TOKEN_ID = 8  # ids below are reserved for specials, as in the real vocabulary


class MarkovDocuments:
    """Random-access source; document i is a pure function of (seed, first_index + i): sources with
    disjoint index ranges share the chain but never a walk (training and held-out documents)."""

    def __init__(self, vocab_size: int, num_documents: int, min_length: int, max_length: int, seed: int,
                 branching: int = 4, first_index: int = 0):
        if vocab_size <= FIRST_TOKEN_ID + branching:
            raise ValueError(f"vocab_size={vocab_size} leaves no room for synthetic tokens")
        if not 2 <= min_length <= max_length:
            raise ValueError(f"need 2 <= min_length <= max_length, got {min_length}, {max_length}")
        self.num_states = vocab_size - FIRST_TOKEN_ID
        self.num_documents, self.min_length, self.max_length, self.seed = num_documents, min_length, max_length, seed
        self.first_index = int(first_index)
        table_rng = np.random.default_rng([seed, 0xC0FFEE])
        self.successors = np.stack([table_rng.choice(self.num_states, branching, replace=False)
                                    for _ in range(self.num_states)])
        self.probs = table_rng.dirichlet(np.ones(branching), size=self.num_states)
        self.cumulative = np.cumsum(self.probs, axis=1)

    @property
    def entropy_per_token(self) -> float:
        """The best achievable mean loss on transitions (nats), averaged uniformly over states."""
        return float(np.mean(-np.sum(self.probs * np.log(self.probs), axis=1)))

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} of {self.num_documents}")
        rng = np.random.default_rng([self.seed, self.first_index + int(index)])
        length = int(rng.integers(self.min_length, self.max_length + 1))
        states = np.empty(length - 1, np.int64)
        states[0] = rng.integers(self.num_states)
        draws = rng.random(length - 1)
        for i in range(1, length - 1):
            choice = min(int(np.searchsorted(self.cumulative[states[i - 1]], draws[i])), self.successors.shape[1] - 1)
            states[i] = self.successors[states[i - 1], choice]
        tokens = np.concatenate([[EOS_ID], states + FIRST_TOKEN_ID]).astype(np.int32)
        return {"tokens": tokens, "weights": np.ones(length, np.float32)}


def documents(data_config, vocab_size: int, heldout: bool = False) -> grain.MapDataset:
    """The training documents, or as many held-out ones: the walks just past the training range."""
    n = int(data_config.num_documents)
    # checked here, naming the fields: a negative count or seed failed inside Grain or NumPy
    for name, value, least in (("num_documents", n, 1), ("source_seed", int(data_config.source_seed), 0),
                               ("min_doc_length", int(data_config.min_doc_length), 2)):
        if value < least:
            raise ValueError(f"data.{name}={value} must be >= {least}")
    if int(data_config.max_doc_length) < int(data_config.min_doc_length):
        raise ValueError(f"data.max_doc_length={data_config.max_doc_length} must be >= "
                         f"data.min_doc_length={data_config.min_doc_length}")
    source = MarkovDocuments(vocab_size, n, int(data_config.min_doc_length), int(data_config.max_doc_length),
                             int(data_config.source_seed), first_index=n if heldout else 0)
    return grain.MapDataset.source(source)
