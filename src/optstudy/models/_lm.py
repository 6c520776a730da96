"""Word-level language models: the LSTMs of AdaBound's Penn Treebank experiment (Luo et al. 2019, section 5)."""

from __future__ import annotations

from torch import nn

from optstudy.errors import ConfigError


class LSTMLanguageModel(nn.Module):
    """Embedding, ``layers`` stacked LSTMs and a linear decoder to the vocabulary, after PyTorch's
    examples/word_language_model (``RNNModel``), which AdaBound's 1-, 2- and 3-layer PTB LSTMs follow.

    Maps ``(batch, bptt)`` token ids to ``(batch, bptt, vocabulary)`` logits. The hidden state starts at zero for
    every batch and is not carried over from the previous one (no truncated BPTT across batches), so batches are
    independent and can be shuffled. Dropout acts on the embeddings, between LSTM layers and on the LSTM output, as
    in the example. ``tie_weights`` shares the embedding matrix with the decoder (Press & Wolf 2017; Inan et al.
    2017), which needs ``emb == hidden``.
    """

    def __init__(self, vocabulary: int, emb: int, hidden: int, layers: int, dropout: float, tie_weights: bool):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocabulary, emb)
        # nn.LSTM's dropout only acts between layers and warns when there is just one
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden, vocabulary)
        self._init_weights()
        if tie_weights:
            self.decoder.weight = self.encoder.weight

    def _init_weights(self):
        """The example's initialisation: uniform in [-0.1, 0.1] for embedding and decoder, zero decoder bias; the
        LSTM keeps PyTorch's default uniform in [-1/sqrt(hidden), 1/sqrt(hidden)]."""
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens):
        out, _ = self.rnn(self.drop(self.encoder(tokens)))  # no initial state given: zeros
        return self.decoder(self.drop(out))


def lstm(data, emb=200, layers=1, hidden=200, dropout=0.2, tie_weights=False) -> nn.Module:
    """An LSTM language model over ``data.n_classes`` words; the defaults are PyTorch's word_language_model example's
    (emb 200, hidden 200, dropout 0.2) except ``layers`` 1 (AdaBound runs 1, 2 and 3: ``model.layers=3``)."""
    if layers not in (1, 2, 3):
        raise ConfigError(f"model.layers: AdaBound's PTB LSTMs have 1, 2 or 3 layers, got {layers!r}")
    if tie_weights and emb != hidden:
        raise ConfigError(f"model.tie_weights: tying shares the embedding with the decoder, so it needs emb == "
                          f"hidden, got emb={emb}, hidden={hidden}")
    return LSTMLanguageModel(data.n_classes, emb, hidden, layers, dropout, tie_weights)


MODELS = {"lstm": ("language_model", lstm)}
