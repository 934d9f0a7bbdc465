"""The condition of a training step when the data carries the condition encoder's inputs (dataset.conditions=
encoder_inputs): lyric token ids are embedded with the text encoder's token table, then the condition encoder turns
caption states, lyric embeddings and timbre references into encoder_hidden_states, exactly as the official
preprocessing does once per song (ACESTEP15.md e.3-5) but inside every step, so the encoder can train.

    table = load_token_table(cfg.model, dtype)            # [V, D_text] from <text encoder>/model.safetensors
    conditioner = Conditioner(model.encoder, table)
    hidden, mask = conditioner(batch)                     # [B, L, H_enc], [B, L] float32

Each row comes out as encoding its sample alone gives it (`as_stored`), so a frozen encoder reproduces the stored
outputs of the same songs, batch padding included (zeros after each sample's own L = Ll_i + R_i + Lt_i).

A frozen encoder runs without autograd; an encoder with any trained weight (a mode.unfreeze stage) runs with it.
With mode.text_encoder=lora the caption's text hidden states are not read from the data: the trained text encoder
computes them from the caption's token ids (train/text_encoder.py) in the same step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from acestep_ft.data.batch import Batch
from acestep_ft.errors import ConfigError, UserError
from acestep_ft.model.checkpoint_io import TEXT_ENCODER_DIR
from acestep_ft.model.encoder import pack_sequences
from acestep_ft.train.sample_audio import sibling_dir
from acestep_ft.train.text_encoder import run_text_encoder

TABLE_SUFFIX = "embed_tokens.weight"       # Qwen3Model: embed_tokens.weight; Qwen3ForCausalLM: model.embed_tokens...
RANDOM_TABLE_SEED = 20240501               # random-init models (model.path None) get this fixed random table
RANDOM_TABLE_STD = 0.02                    # the transformers init of an embedding


def random_table(model_cfg: Any) -> bool:
    """A random-init model (model.path None) without a text encoder given gets a fixed random token table."""
    return model_cfg.path is None and model_cfg.text_encoder_path is None


def text_encoder_dir(model_cfg: Any) -> Path:
    """model.text_encoder_path, else <model.path>/../Qwen3-Embedding-0.6B; ConfigError when neither exists."""
    found = sibling_dir(model_cfg.text_encoder_path, model_cfg.path, TEXT_ENCODER_DIR, "model.text_encoder_path",
                        "the checkpoint's text encoder")
    if found is None:
        where = (f"{Path(model_cfg.path).expanduser().parent / TEXT_ENCODER_DIR} (beside model.path) does not exist"
                 if model_cfg.path is not None else "model.path is not set, so there is no default")
        raise ConfigError(f"the text encoder directory is needed but {where}; set model.text_encoder_path=<the "
                          f"checkpoint's {TEXT_ENCODER_DIR}/>")
    return found


def _table_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no *.safetensors file, so the text encoder's token table cannot be read. Fix: "
                        f"model.text_encoder_path=<the checkpoint's {TEXT_ENCODER_DIR}/ (transformers layout)>.")
    return files


def load_token_table(model_cfg: Any, dtype: torch.dtype) -> Tensor:
    """The text encoder's token embedding table [V, D_text] in `dtype`: read from its safetensors (only this tensor
    is read), or, for a random-init model (model.path None and no model.text_encoder_path), a fixed random table of
    model.text_vocab_size rows. Its width must be model.text_hidden_dim."""
    if random_table(model_cfg):
        g = torch.Generator().manual_seed(RANDOM_TABLE_SEED)
        table = torch.randn(model_cfg.text_vocab_size, model_cfg.text_hidden_dim, generator=g) * RANDOM_TABLE_STD
        return table.to(dtype)
    directory = text_encoder_dir(model_cfg)
    for file in _table_files(directory):
        with safe_open(str(file), framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith(TABLE_SUFFIX)), None)
            if key is not None:
                table = f.get_tensor(key)
                break
    else:
        raise UserError(f"{directory}: no tensor named *{TABLE_SUFFIX} in its safetensors files: this is not a "
                        "transformers Qwen3 text encoder. Fix: model.text_encoder_path=<the checkpoint's "
                        f"{TEXT_ENCODER_DIR}/>.")
    if table.ndim != 2 or table.shape[1] != model_cfg.text_hidden_dim:
        raise UserError(f"{directory}: token table {key} has shape {list(table.shape)}, but the condition encoder "
                        f"reads width model.text_hidden_dim={model_cfg.text_hidden_dim}. Fix: model.text_encoder_path="
                        "<the text encoder of this checkpoint family>.")
    return table.to(dtype)


class Conditioner(nn.Module):
    """Encoder inputs of a Batch -> (encoder_hidden_states [B, L, H_enc], encoder_attention_mask [B, L] float32).

    `encoder` is the model's condition encoder (shared, not copied: a trained encoder trains here); `table` the text
    encoder's token embedding table [V, D_text] (a buffer, never trained); `text_encoder` the trained text encoder
    (mode.text_encoder=lora) or None. `checked_below`: a bound the data layer has already checked every token id
    against (model.text_vocab_size); when the table has at least that many rows the per-step range check, which reads
    the ids back to the host, is left out. Call it under the run's autocast.
    """

    def __init__(self, encoder: nn.Module, table: Tensor, text_encoder: Optional[nn.Module] = None,
                 checked_below: Optional[int] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.text_encoder = text_encoder
        self.register_buffer("table", table, persistent=False)
        self.check_ids = checked_below is None or checked_below > table.shape[0]

    @property
    def trains(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def embed_lyrics(self, ids: Tensor, keys: list) -> Tensor:
        """Lyric token ids [B, Ll] -> [B, Ll, D_text]; an id outside the table is an error naming the sample."""
        vocab = self.table.shape[0]
        bad = (ids < 0) | (ids >= vocab) if self.check_ids else None
        if bad is not None and bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            raise UserError(f"sample {keys[row]}: lyric token id {int(ids[row][bad[row]][0])} is outside the text "
                            f"encoder's table of {vocab} tokens: the data was tokenized for another text encoder. "
                            "Fix: model.text_encoder_path=<the text encoder the data was preprocessed with>, or "
                            "re-run scripts/preprocess.py with this one.")
        return F.embedding(ids, self.table)

    def forward(self, batch: Batch) -> Tuple[Tensor, Tensor]:
        if batch.lyric_token_ids is None:
            raise UserError(f"batch of samples {batch.keys[:3]} carries no condition-encoder inputs (lyric_token_ids); "
                            "dataset.conditions=encoder_inputs needs data preprocessed with preprocess.store=inputs "
                            "or both.")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):
            lyric = self.embed_lyrics(batch.lyric_token_ids, batch.keys)
            dtype = self.table.dtype  # the official preprocessor feeds the encoder in its own compute dtype
            hidden, mask = self.encoder(
                self.text_states(batch).to(dtype), batch.text_attention_mask.to(dtype), lyric,
                batch.lyric_attention_mask.to(dtype), batch.refer_audio_latents.to(dtype), batch.refer_audio_order)
            return as_stored(hidden, mask.float(), batch)

    def text_states(self, batch: Batch) -> Tensor:
        """The caption's text hidden states [B, Lt, D_text]: as stored, or (mode.text_encoder=lora) the trained text
        encoder run on the caption's token ids."""
        if self.text_encoder is None:
            return batch.text_hidden_states
        if batch.text_token_ids is None:
            raise UserError(f"batch of samples {batch.keys[:3]} carries no caption token ids (text_token_ids), which "
                            "mode.text_encoder=lora runs the text encoder on. Fix: re-run scripts/preprocess.py with "
                            "preprocess.store=inputs or both (they store text_token_ids), or mode.text_encoder=frozen.")
        return run_text_encoder(self.text_encoder, batch.text_token_ids)


def as_stored(hidden: Tensor, mask: Tensor, batch: Batch) -> Tuple[Tensor, Tensor]:
    """The encoder's packed output for a padded batch [B, L, H] / [B, L] -> each row as encoding its sample alone
    gives it (what encoder-outputs data of the same songs stores), zero-padded to the longest: the positions of the
    batch's own lyric / caption padding tokens are dropped, the sample's own masked tokens kept in their place.

    The encoder packs each row as [valid lyric, references, valid caption, masked lyric, masked caption]; a batch
    adds masked positions for the tokens other samples are longer by, which a sample encoded alone does not have.
    The same packing is replayed on "is the sample's own token" flags to find and remove them."""
    b, ll = batch.lyric_token_ids.shape
    lt, dev = batch.text_hidden_states.shape[1], hidden.device
    own_lyric = torch.arange(ll, device=dev)[None] < batch.lyric_lengths.to(dev)[:, None]   # [B, Ll]
    own_text = torch.arange(lt, device=dev)[None] < batch.text_lengths.to(dev)[:, None]     # [B, Lt]
    refs = torch.bincount(batch.refer_audio_order.to(dev), minlength=b)                     # [B] R_i
    own_refs = torch.arange(int(refs.max()), device=dev)[None] < refs[:, None]              # [B, R] = timbre mask
    flags, flag_mask = pack_sequences(own_lyric[..., None].float(), own_refs[..., None].float(),
                                      batch.lyric_attention_mask.to(dev), own_refs)
    flags, _ = pack_sequences(flags, own_text[..., None].float(), flag_mask, batch.text_attention_mask.to(dev))
    keep = flags[..., 0] > 0                                                                 # [B, L]
    if bool(keep.all()):
        return hidden, mask  # no batch padding (equal lengths): the rows are already as stored
    order = keep.long().argsort(dim=1, descending=True, stable=True)
    kept = torch.gather(keep, 1, order)[:, : int(keep.sum(dim=1).max())]                    # [B, L_own]
    order = order[:, : kept.shape[1]]
    hidden = torch.gather(hidden, 1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    return torch.where(kept[..., None], hidden, 0.0), torch.where(kept, torch.gather(mask, 1, order), 0.0)
