"""Our OmniGen2 transformer against golden forwards of the official code (tiny random weights).

Every `<parity_dir>/transformer_cases/*.json` is a case: inputs, output and `debug.*` intermediates
(see the README there). Padding rows of padded batches are garbage in the reference, so only valid
rows are compared; the lengths that say which rows are valid come from the inputs, not our model.

The sinusoidal timestep features are sin/cos of 1000*t in float32: a one-ulp difference in a CPU
math kernel between torch builds moves the timestep embedding by ~1e-6 and the output by ~1e-5.
So the refiners/layers/output are checked with the reference's own timestep embedding substituted
(after checking ours against it), and the output of the unmodified forward with a looser bound.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnigen2_batch.model.transformer import OmniGen2Transformer2DModel

TOL = dict(atol=1e-5, rtol=1e-5)
END_TO_END_TOL = dict(atol=1e-4, rtol=1e-4)


@dataclass
class Case:
    name: str
    tensors: dict
    hidden_states: object  # [B,C,H,W] tensor or list of [C,H,W]
    refs: list | None  # per sample: None or list of [C,h,w]
    patch: int  # the fixture transformer's patch_size

    @property
    def images(self):
        return list(self.hidden_states)

    def args(self, freqs_cis):
        t = self.tensors
        return (self.hidden_states, t["timestep"], t["text_hidden_states"], freqs_cis, t["text_attention_mask"])

    # Valid-row lengths, derived from the inputs alone.
    def text_lens(self):
        return self.tensors["text_attention_mask"].sum(1).tolist()

    def image_lens(self):
        p = self.patch
        return [(img.shape[-2] // p) * (img.shape[-1] // p) for img in self.images]

    def ref_lens(self):
        """Per sample, the token count of each ref image ([] without refs)."""
        refs = self.refs or [None] * len(self.images)
        p = self.patch
        return [[(r.shape[-2] // p) * (r.shape[-1] // p) for r in rs or []] for rs in refs]

    def seq_lens(self):
        return [t + sum(r) + n for t, r, n in zip(self.text_lens(), self.ref_lens(), self.image_lens())]


def load_case(json_path: Path, patch: int) -> Case:
    structure = json.loads(json_path.read_text())["structure"]
    t = load_file(json_path.with_suffix(".safetensors"))
    batch = t["timestep"].shape[0]
    if structure["hidden_states"].startswith("tensor"):
        hidden = t["hidden_states"]
    else:
        hidden = [t[f"hidden_states.{i}"] for i in range(batch)]
    refs = structure["ref_image_hidden_states"]
    if refs is not None:
        refs = [
            None if n is None else [t[f"ref_image_hidden_states.{i}.{j}"] for j in range(n)] for i, n in enumerate(refs)
        ]
    return Case(json_path.stem, t, hidden, refs, patch)


def valid_rows(padded: torch.Tensor, lengths) -> torch.Tensor:
    """The first lengths[i] rows of padded[i], concatenated."""
    rows = [padded[i, :n] for i, n in enumerate(lengths)]
    return torch.cat(rows) if rows else padded.new_zeros(0, *padded.shape[2:])


def as_complex(stored: torch.Tensor) -> torch.Tensor:
    """A complex table from its stored view_as_real form, in freshly allocated memory: viewing a
    float64 buffer memory-mapped from safetensors as complex128 (16-byte alignment) can crash."""
    return torch.complex(stored[..., 0].clone(), stored[..., 1].clone())


@pytest.fixture(scope="module")
def model(parity_dir):
    return OmniGen2Transformer2DModel.from_pretrained(parity_dir / "tiny" / "transformer").eval()


@pytest.fixture(scope="module")
def freqs_cis(parity_dir):
    stored = load_file(parity_dir / "transformer_cases" / "freqs_cis.safetensors")
    return [as_complex(stored[f"axis{i}"]) for i in range(len(stored))]


@pytest.fixture(scope="module")
def cases(parity_dir, model):
    paths = sorted((parity_dir / "transformer_cases").glob("*.json"))
    assert paths, f"no transformer cases under {parity_dir / 'transformer_cases'}"
    return [load_case(p, model.config.patch_size) for p in paths]


def test_fixture_loads_without_missing_or_unexpected_keys(parity_dir):
    _, info = OmniGen2Transformer2DModel.from_pretrained(parity_dir / "tiny" / "transformer", output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def test_our_rope_tables_reproduce_the_fixture(model, freqs_cis):
    ours = model.rope_tables()
    assert [t.dtype for t in ours] == [torch.complex128] * 3
    for axis, (mine, theirs) in enumerate(zip(ours, freqs_cis)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12, msg=f"rope table of axis {axis}")


def test_position_ids_and_rotary_tables(model, freqs_cis, cases, subtests):
    for case in cases:
        with subtests.test(case=case.name):
            t = case.tensors
            refs = case.refs or [None] * len(case.images)
            layout = model.sequence_layout(t["text_attention_mask"], case.images, refs)
            seq = case.seq_lens()
            assert torch.equal(valid_rows(layout.position_ids, seq), valid_rows(t["debug.position_ids"], seq))

            rotary = model.rotary_embeddings(freqs_cis, layout)
            flat_ref_lens = [n for lens in case.ref_lens() for n in lens]
            ref_totals = [sum(lens) for lens in case.ref_lens()]
            pairs = {  # name: (ours, our lengths, reference index, reference lengths)
                "text": (rotary.text, case.text_lens(), 0, case.text_lens()),
                "refs": (rotary.refs, flat_ref_lens, 1, ref_totals),
                "image": (rotary.image, case.image_lens(), 2, case.image_lens()),
                "joint": (rotary.joint, seq, 3, seq),
            }
            for name, (ours, lens, index, ref_lens) in pairs.items():
                # Ours: (cos, sin) looked up in float64 and rounded once to float32.
                theirs = t[f"debug.rope.{index}"].to(torch.float32)
                assert torch.equal(valid_rows(ours, lens), valid_rows(theirs, ref_lens)), name


def _record_outputs(model, names, recorded, temb_override):
    """Forward hooks that keep each named module's output; time_caption_embed's temb is replaced by
    temb_override() when that returns a tensor."""
    handles = []
    for name in names:
        def hook(module, args, output, name=name):
            recorded[name] = output
            override = temb_override() if name == "time_caption_embed" else None
            return (override, output[1]) if override is not None else None
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


def _intermediate_lengths(case: Case, name: str):
    """(our valid lengths, reference valid lengths) of a recorded intermediate."""
    seq, text, image = case.seq_lens(), case.text_lens(), case.image_lens()
    if name.startswith("ref_image_refiner"):
        # The reference batches one row per ref image plus an empty row per sample without refs.
        return [n for lens in case.ref_lens() for n in lens], [n for lens in case.ref_lens() for n in lens or [0]]
    lengths = {"context_refiner": text, "noise_refiner": image, "layers": seq, "norm_out": seq}[name.split(".")[0]]
    return lengths, lengths


def _outputs(output):
    return output if isinstance(output, list) else list(output)


def _reference_outputs(case: Case):
    t = case.tensors
    if isinstance(case.hidden_states, list):
        return [t[f"output.{i}"] for i in range(len(case.images))]
    return list(t["output"])


def test_forward_and_intermediates_match(model, freqs_cis, cases, subtests):
    block_names = [k.removeprefix("debug.") for k in cases[0].tensors if k.startswith("debug.")]
    block_names = sorted({n for n in block_names if not n.startswith(("rope", "position_ids", "time_caption_embed"))})
    assert "layers.0" in block_names and "norm_out" in block_names
    for case in cases:
        with subtests.test(case=case.name):
            t, recorded = case.tensors, {}
            names = ["time_caption_embed", *block_names]
            handles = _record_outputs(model, names, recorded, lambda: t["debug.time_caption_embed.0"])
            try:
                with torch.no_grad():
                    output = model(*case.args(freqs_cis), ref_image_hidden_states=case.refs)
            finally:
                for h in handles:
                    h.remove()

            temb, caption = recorded["time_caption_embed"]
            torch.testing.assert_close(temb, t["debug.time_caption_embed.0"], **TOL)
            torch.testing.assert_close(caption, t["debug.time_caption_embed.1"], **TOL)
            for name in block_names:
                ours_lens, ref_lens = _intermediate_lengths(case, name)
                expected = valid_rows(t[f"debug.{name}"], ref_lens)
                if not expected.numel():  # e.g. the ref refiner of a batch without refs
                    assert name not in recorded or not recorded[name].numel(), name
                    continue
                torch.testing.assert_close(valid_rows(recorded[name], ours_lens), expected, **TOL, msg=name)
            assert isinstance(output, list) == isinstance(case.hidden_states, list)
            for i, (ours, theirs) in enumerate(zip(_outputs(output), _reference_outputs(case), strict=True)):
                torch.testing.assert_close(ours, theirs, **TOL, msg=f"output {i}")


def test_unmodified_forward_matches_end_to_end(model, freqs_cis, cases, subtests):
    for case in cases:
        with subtests.test(case=case.name), torch.no_grad():
            output = model(*case.args(freqs_cis), ref_image_hidden_states=case.refs)
            for ours, theirs in zip(_outputs(output), _reference_outputs(case), strict=True):
                torch.testing.assert_close(ours, theirs, **END_TO_END_TOL)


def mixed_batch(config, seed=0):
    """Different image sizes, 2 / 0 / 1 / 3 refs of different sizes, different text lengths; every
    dimension from the model's config (sizes in patches)."""
    g = torch.Generator().manual_seed(seed)
    p, c = config.patch_size, config.in_channels
    latents = [torch.randn(c, h * p, w * p, generator=g) for h, w in [(4, 3), (3, 5), (2, 2), (5, 4)]]
    ref_sizes = [[(2, 4), (3, 3)], None, [(4, 2)], [(1, 2), (2, 1), (3, 2)]]
    refs = [None if s is None else [torch.randn(c, h * p, w * p, generator=g) for h, w in s] for s in ref_sizes]
    text_lens = [5, 9, 1, 7]
    text = torch.randn(4, 9, config.text_feat_dim, generator=g)
    mask = (torch.arange(9)[None] < torch.tensor(text_lens)[:, None]).long()
    timestep = torch.tensor([0.1, 0.5, 0.7, 0.95])
    return latents, timestep, text, mask, refs, text_lens


def test_batch_matches_each_sample_alone(model):
    latents, timestep, text, mask, refs, text_lens = mixed_batch(model.config)
    with torch.no_grad():
        batched = model(latents, timestep, text, None, mask, ref_image_hidden_states=refs)
        for i in range(4):
            n = text_lens[i]
            alone = model([latents[i]], timestep[i : i + 1], text[i : i + 1, :n], None, mask[i : i + 1, :n],
                          ref_image_hidden_states=[refs[i]])
            torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5, msg=f"sample {i}")


def test_left_padded_text_is_refused(model):
    mask = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        c, p, width = model.config.in_channels, model.config.patch_size, model.config.text_feat_dim
        model(torch.zeros(1, c, 2 * p, 2 * p), torch.tensor([0.5]), torch.zeros(1, 3, width), None, mask)
