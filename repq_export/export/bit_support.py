"""Which bit widths each exported form can hold: the one place every command asks, before any work."""

from __future__ import annotations

from ..errors import UserError

FORMS = ("onnxruntime", "tensorrt")


def supported_bits(form: str) -> tuple[int, ...]:
    """Bit widths (weights and activations alike) that the exported `form` represents exactly.

    Both forms carry every code as signed int8 (q - zp); an 8-bit asymmetric code range does not
    fit that once shifted by its zero point, so 2..7 bits are exportable."""
    if form not in FORMS:
        raise ValueError(f"supported_bits: unknown form {form!r} (one of {', '.join(FORMS)})")
    return tuple(range(2, 8))


def check_export_bits(w_bits: int, a_bits: int, form: str, w_option: str = "--w-bits",
                      a_option: str = "--a-bits") -> None:
    """Refuse bit widths `form` cannot export, naming the option; called before calibration starts."""
    allowed = supported_bits(form)
    for option, value in ((w_option, w_bits), (a_option, a_bits)):
        if value not in allowed:
            raise UserError(f"{option} {value}: the {form} export holds {allowed[0]}..{allowed[-1]} bits only "
                            f"({value}-bit codes do not fit its int8 Q/DQ); fake quant in tools/test.py takes 8")
