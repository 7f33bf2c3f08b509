"""Specifics (prodesc/specs.py) on real lines of the shared catalogs: what is read, what a source supports, the
review flag, the training answers' cut and grounded decoding's word test."""

from __future__ import annotations

from prodesc.specs import Grounding, Sources, keep_supported, specifics, support_counts, unsupported

# Real lines of ../shared/data/abt.jsonl (the Abt side of Abt-Buy) and lf_amazon_first400.json
SWITCHER = ("Sony Switcher - SBV40S", "Sony Switcher - SBV40S/ Eliminates Disconnecting And Reconnecting Cables/ "
            "Compact Design/ 4 A/V Inputs With S-Video Jacks/ 1 A/V Output With S-Video (Y/C)Jack/ 2 Audio Output")
BOSE = ("Bose Acoustimass 5 Series III Speaker System - AM53BK", "Bose Acoustimass 5 Series III Speaker System - "
        "AM53BK/ 2 Dual Cube Speakers With Two 2-1/2' Wide-range Drivers In Each Speaker/ Powerful Bass Module With "
        "Two 5-1/2' Woofers/ 200 Watts Max Power/ Black Finish")
SHARP = ("Sharp Aquos 32' Black LCD HDTV - LC32D64U", "Sharp Aquos 32' Black LCD HDTV - LC32D64U/ 1920 x 1080p "
         "Pixel Resolution/ Up To 60000 Hours Lamp Life/ Built-In ATSC/QAM/NTSC Tuner/ 10000:1 Dynamic Contrast Ratio/ "
         "4ms Response Time/ 4-Wavelength Backlight System/ Black Finish")
TUTU = ("Girls Ballet Tutu Neon Pink", "High quality 3 layer ballet tutu. 12 inches in length")
# what the preset wrote for the switcher (issue 23), copied from a DVD changer among its neighbours
INVENTED = ("Sony Switcher - SBV40S/ 12-Bit Digital Audio/ Dolby Digital And Dts Playback/ 5.1-Channel Surround "
            "Sound/ 900mW Power Output/ Black Finish")


def _read(text: str) -> list[tuple[str, str]]:
    return [(s.kind, s.text) for s in specifics(text)]


def test_specifics_reads_codes_numbers_quantities_and_colours_of_spec_lists():
    assert _read(SWITCHER[1]) == [("code", "SBV40S"), ("number", "4"), ("number", "1"), ("number", "2")]
    got = _read(BOSE[1])
    assert ("code", "AM53BK") in got and ("quantity", "200 Watts") in got and ("colour", "Black") in got
    got = _read(SHARP[1])
    assert ("quantity", "32'") in got and ("quantity", "1080p") in got and ("quantity", "60000 Hours") in got
    assert ("code", "LC32D64U") in got and ("number", "1920") in got


def test_specifics_of_prose_and_raw_catalog_text():
    assert _read(TUTU[1]) == [("number", "3"), ("quantity", "12 inches")]
    assert _read("Kerr&#8217;s adventures have entertained children for more than 30 years") == [
        ("quantity", "30 years")]  # an HTML entity is no number
    assert _read("Runs on Windows XP and Mac OS X, for Xbox 360") == [
        ("platform", "Windows XP"), ("platform", "Mac OS X"), ("platform", "Xbox 360")]
    assert _read("a 20th-century classic in navy") == [("number", "20th-century"), ("colour", "navy")]
    assert [s.key for s in specifics("the 4th of 5 volumes")] == ["4", "5"]  # each number its own value


def test_hand_check_false_alarms_are_gone():
    # false alarms found by hand on 50 Abt answers (docs/QUALITY.md): ratios, "5 In 1", platform numbers, plating
    assert _read("10000:1 Dynamic Contrast Ratio") == [("number", "10000")]
    assert _read("5 In 1 Printing") == [("number", "5"), ("number", "1")]
    assert _read("Includes: 1) a lid 2) a (3) basket") == [("number", "3")]  # list markers are no specifics
    assert _read("Nyko PlayStation 3 Cable/ Gold Plated Contacts/ 4ms Response") == [
        ("platform", "PlayStation 3"), ("quantity", "4ms")]


def test_unsupported_lists_what_no_source_states():
    assert unsupported(INVENTED, [SWITCHER[0], SWITCHER[1]]) == ["12-Bit", "5.1-Channel", "900mW", "Black"]
    # the same specifics written another way are supported: separators, units, trailing zeros, colour families
    src = ["Sony CD Player - CDP-CE375/ 200 Watts/ 2.0 Channel/ Navy Blue Finish"]
    assert unsupported("CDPCE375 with 200W, 2 channel output, in blue", src) == []
    assert unsupported("in teal", src) == []  # teal is blue and green
    assert unsupported("A 16 oz mug", ["Mug 12 oz"]) == ["16 oz"]


def test_support_counts_precision_recall_and_invented():
    c = support_counts(INVENTED, *SWITCHER)
    assert c["stated"] == 5 and c["supported"] == 1 and c["invented"] == ["12-Bit", "5.1-Channel", "900mW", "Black"]
    assert c["ref_new"] == 3 and c["ref_new_stated"] == 0  # 4, 1 and 2 inputs/outputs: not in the title
    good = support_counts("Sony Switcher - SBV40S/ 4 A/V Inputs", *SWITCHER)
    assert good == {"stated": 2, "supported": 2, "invented": [], "ref_new": 3, "ref_new_stated": 1}


def test_keep_supported_drops_clauses_with_unsupported_specifics_and_keeps_the_opening():
    assert keep_supported(BOSE[1], [BOSE[0]]) == "Bose Acoustimass 5 Series III Speaker System - AM53BK"
    sibling = "Bose Acoustimass 5 - AM5BK/ 200 Watts Max Power/ Black Finish"
    assert keep_supported(BOSE[1], [BOSE[0], sibling]) == (
        "Bose Acoustimass 5 Series III Speaker System - AM53BK/ 200 Watts Max Power/ Black Finish")
    assert keep_supported(TUTU[1], [TUTU[0]]) == "High quality 3 layer ballet tutu."  # sentences are clauses too
    assert keep_supported("", ["x"]) == ""


def test_grounding_allows_a_digit_word_only_as_the_prompt_writes_it():
    g = Grounding([SWITCHER[0], "Sony DVD Changer/ 5.1-Channel Output/ 900mW"])
    assert g.allows("Switcher - SBV", "4") and g.allows("Switcher - SBV4", "0S")
    assert not g.allows("Switcher - SBV4", "1")  # SBV41: no such code
    assert g.allows("Output ", "900") and g.allows("Output 900", "mW")
    assert not g.allows("Output 900", " Watts")  # "900" alone is not what the prompt writes
    assert not g.allows("with ", "12")  # no word of the prompt starts with 12
    assert g.allows("with 12", "")  # nothing written: nothing to check
    assert Sources(["x"]).numbers == set()
