use super::*;

/// The opener's continuation as shown, whether a correction was seen, whether the device
/// must finish the clause first, and the repairs.
fn stitch(opener: &str, deltas: &[&str]) -> (String, bool, bool, Vec<Repair>) {
    let mut seam = Seam::new(opener);
    let (mut out, mut corrected, mut first, mut repairs) = (String::new(), false, false, Vec::new());
    let mut outputs: Vec<SeamOutput> = deltas.iter().map(|d| seam.push(d)).collect();
    outputs.push(seam.flush());
    for o in outputs {
        out.push_str(&o.text);
        corrected |= o.correction;
        first |= o.finish_first;
        repairs.extend(o.repairs);
    }
    (out, corrected, first, repairs)
}

fn text(opener: &str, deltas: &[&str]) -> String {
    stitch(opener, deltas).0
}

#[test]
fn a_plain_continuation_gets_one_space() {
    assert_eq!(text("The sky looks blue because", &["sun", "light scatters."]), " sunlight scatters.");
    assert_eq!(text("The sky looks blue because", &["   of", " scattering."]), " of scattering.");
}

#[test]
fn punctuation_attaches_without_a_space() {
    assert_eq!(text("Paris is the capital", &[", and", " it is big."]), ", and it is big.");
}

#[test]
fn a_restated_opener_is_dropped_even_across_deltas() {
    let (out, _, _, repairs) = stitch("Removing odor from inside", &["Removing odor", " from in", "side your shoes is easy."]);
    assert_eq!(out, " your shoes is easy.");
    assert_eq!(repairs, [Repair::Restated]);
    assert_eq!(text("The capital of France", &["the capital of france is Paris."]), " is Paris.");
}

#[test]
fn a_restatement_is_found_whatever_its_punctuation_or_a_lead_in() {
    let mile = "A mile is approximately 1.5289 kilometers.";
    assert_eq!(text(mile, &["A mile is approximately 1.5289 kilometers", " Roughly speaking."]), " Roughly speaking.", "without its period");
    assert_eq!(text(mile, &["a mile, is approximately 1.5289 kilometers! That is all."]), " That is all.", "other punctuation");
    assert_eq!(text("Removing odor from inside your shoes is a", &["You're right, removing odor from inside your shoes is a simple task."]), " simple task.");
    assert_eq!(text("Removing odor from inside your shoes is a", &["Sure! Removing odor from inside your shoes is a simple task."]), " simple task.");
}

#[test]
fn a_restatement_that_goes_its_own_way_is_dropped_to_its_sentence_end() {
    // One word short, then its own sentence: that sentence goes, the next stays.
    let (out, _, first, repairs) = stitch("A mile is approximately 1.5289 kilometers.", &["A mile is approximately 1.5289. It is also 5,280 feet."]);
    assert_eq!(out, " It is also 5,280 feet.");
    assert!(!first, "the opener ended its sentence");
    assert_eq!(repairs, [Repair::Restated]);
    // After an opener cut mid-clause, what follows is a new sentence: the device finishes first.
    let (out, _, first, repairs) = stitch("Removing odor from inside your shoes is a", &["Removing odor from shoes is easy. Sprinkle baking soda."]);
    assert_eq!(out, " Sprinkle baking soda.");
    assert!(first);
    assert_eq!(repairs, [Repair::Restated, Repair::Restart]);
    // The same, with the new sentence in a later delta.
    let (out, _, first, _) = stitch("Removing odor from inside your shoes is a", &["Removing odor from shoes is easy.", " ", "Sprinkle baking soda."]);
    assert_eq!(out, " Sprinkle baking soda.");
    assert!(first);
}

#[test]
fn text_that_only_repeats_the_openers_words_later_is_kept() {
    let (out, _, first, repairs) = stitch("The capital of France", &[" is Paris. The capital of France has two million people."]);
    assert_eq!(out, " is Paris. The capital of France has two million people.");
    assert!(!first && repairs.is_empty());
}

#[test]
fn an_echo_of_the_prompt_is_dropped() {
    let echo = "The user asked:\nWhy is the sky blue?\n\nThe reply so far (continue right after its last character):\nThe sky is blue because sunlight scatters.";
    let (out, _, _, repairs) = stitch("The sky is blue because", &[echo]);
    assert_eq!(out, " sunlight scatters.");
    assert_eq!(repairs, [Repair::Scaffold], "one echoed block, up to and through the opener");
    let (out, _, _, repairs) = stitch("The sky is", &["<opening>The sky", " is</opening> blue because of scattering."]);
    assert_eq!(out, " blue because of scattering.");
    assert_eq!(repairs, [Repair::Scaffold]);
}

#[test]
fn a_new_sentence_after_an_opener_cut_mid_clause_is_a_restart() {
    let (out, _, first, repairs) = stitch("The flu and the common cold have two distinct", &["A virus is a tiny germ."]);
    assert_eq!(out, " A virus is a tiny germ.");
    assert!(first, "the device finishes the clause first");
    assert_eq!(repairs, [Repair::Restart]);
    // After a finished sentence or a comma-free clause end, a new sentence is no restart.
    assert!(!stitch("The sky is blue.", &["It scatters light."]).2);
    assert!(!stitch("The sky looks blue because", &["of", " scattering."]).2);
}

#[test]
fn the_correction_marker_is_lifted_out() {
    let (out, corrected, _, _) = stitch("The moon is made of", &["[[redi", "rect]] rock,", " not cheese."]);
    assert!(corrected);
    assert_eq!(out, " rock, not cheese.");
}

#[test]
fn a_newline_start_is_kept_without_an_added_space() {
    assert_eq!(text("Here are three ways:", &["\n1. Soak them."]), "\n1. Soak them.");
    assert_eq!(text("Here are three ways:", &["\n", "1. Soak them."]), "\n1. Soak them.", "across deltas");
}

#[test]
fn a_word_still_being_written_is_held_until_it_is_whole() {
    let mut seam = Seam::new("Removing odor from inside your shoes is a");
    assert_eq!(seam.push("Remov").text, "");
    assert_eq!(seam.push("ing odor from inside").text, "", "could still be the opener");
    let out = seam.push(" the car is different.");
    assert!(out.text.is_empty() || out.repairs.contains(&Repair::Restated), "{out:?}");
}

#[test]
fn the_hold_is_bounded() {
    let mut seam = Seam::new("The sky is blue because");
    let out = seam.push(&"<opening>".repeat(300));
    assert!(!out.text.is_empty() || seam.decided, "more than 2,000 bytes held decides");
}

#[test]
fn a_restatement_without_the_openers_own_lead_in_is_dropped() {
    let (out, _, first, repairs) = stitch("Yes, dogs can safely eat grapes", &["Dogs can safely eat grapes", " in small amounts."]);
    assert_eq!(out, " in small amounts.");
    assert!(!first, "the restatement went on from the opener's words");
    assert_eq!(repairs, [Repair::Restated]);
}

#[test]
fn a_correction_after_a_restated_opener_is_found() {
    let (out, corrected, first, repairs) =
        stitch("Yes, dogs can safely eat grapes", &["Yes, dogs can safely eat grapes ", "[[redirect]]", " Actually, grapes are toxic to dogs."]);
    assert!(corrected);
    assert_eq!(out, " — actually, grapes are toxic to dogs.", "a dash, not a finished wrong clause");
    assert!(!first);
    assert_eq!(repairs, [Repair::Restated]);
    // A name keeps its capital; an opener that ended its sentence needs no dash.
    assert_eq!(text("The capital of Australia is", &["[[redirect]] Canberra is the capital."]), " — Canberra is the capital.");
    assert_eq!(text("Dogs can eat grapes.", &["[[redirect]] Actually, they cannot."]), " Actually, they cannot.");
}

#[test]
fn a_marker_written_later_is_lifted_out_even_split_across_deltas() {
    let (out, corrected, _, _) = stitch("Grapes are a", &[" healthy treat.", " [[re", "direct]] Actually,", " they are toxic to dogs."]);
    assert!(corrected);
    assert_eq!(out, " healthy treat. Actually, they are toxic to dogs.");
    // Text that only looks like the marker's start is let through at the end.
    assert_eq!(text("Lists look like", &[" this: [[", "1]]"]), " this: [[1]]");
    assert_eq!(text("It ends with", &[" two brackets [["]), " two brackets [[");
}

#[test]
fn an_instruct_reminder_echoed_back_is_dropped() {
    let (out, _, _, repairs) = stitch("The capital of Australia is", &["(Begin your reply with: The capital of Australia is) The capital of Australia is Canberra."]);
    assert_eq!(out, " Canberra.");
    assert_eq!(repairs, [Repair::Scaffold], "the echo, through the opener's last repeat");
}

#[test]
fn a_remark_that_quotes_the_opener_again_is_dropped_with_it() {
    let opener = "Yes, dogs can safely eat grapes as";
    let (out, _, _, repairs) = stitch(opener, &["Here's", " a revised version of the answer:", " \"Yes, dogs can safely eat grapes as", " a treat."]);
    assert_eq!(out, " a treat.");
    assert_eq!(repairs, [Repair::Restated]);
    // A remark that quotes nothing is let through (it was held only while it could).
    assert_eq!(text("The sky looks blue because", &["Here is why: light scatters."]), " Here is why: light scatters.");
}

#[test]
fn a_lead_in_streamed_a_word_at_a_time_still_leads_into_a_restatement() {
    // Seen with SmolLM2: the lead-in's words arrive before its comma or colon.
    let (out, _, _, repairs) = stitch("Compound interest is a type of interest that", &["The", " answer", " to your question is", ":", " Compound interest is a type of interest that", " grows on itself."]);
    assert_eq!(out, " grows on itself.");
    assert_eq!(repairs, [Repair::Restated]);
    // Stock words that lead nowhere are the answer.
    assert_eq!(text("Bananas keep best", &[" so", " the", " fruit", " lasts", " longer."]), " so the fruit lasts longer.");
}

#[test]
fn a_restatement_used_as_a_new_sentences_subject_after_a_finished_opener_goes_with_its_sentence() {
    let (out, _, first, repairs) = stitch("The dreaded dripping tap.", &[" You", "'re", " right", ",", " the", " dreaded", " dripping", " tap", " is", " a classic.", " Fit a new washer."]);
    assert_eq!(out, " Fit a new washer.");
    assert!(!first, "the opener ended its sentence");
    assert_eq!(repairs, [Repair::Restated]);
}

#[test]
fn a_restatement_that_ends_its_sentence_after_an_opener_cut_at_a_comma_is_a_restart() {
    let (out, _, first, repairs) = stitch("Cats knead blankets for comfort,", &[" The", " answer", " is", ":", " Cats", " knead", " blankets", " for", " comfort", ". They", " feel safe."]);
    assert_eq!(out, " They feel safe.");
    assert!(first, "the device finishes the opener's sentence before the cloud's next one");
    assert_eq!(repairs, [Repair::Restated, Repair::Restart]);
}

#[test]
fn a_restatement_without_the_openers_first_word_is_dropped() {
    let (out, _, first, repairs) = stitch("To remove a stain from a carpet,", &[" Remove a stain from a carpet!", "\n\nBlot it with cold water."]);
    assert_eq!(out, "\n\nBlot it with cold water.");
    assert!(first);
    assert_eq!(repairs, [Repair::Restated, Repair::Restart]);
    // Only with 3 words of it: two are an ordinary answer.
    assert_eq!(text("To remove a stain from a carpet,", &[" remove a", " rug too."]), " remove a rug too.");
}

#[test]
fn a_new_sentence_after_an_opener_cut_at_a_comma_is_a_restart() {
    let (out, _, first, repairs) = stitch("To make your WiFi faster at home,", &[" To improve your WiFi speed,", " move the router."]);
    assert_eq!(out, " To improve your WiFi speed, move the router.");
    assert!(first);
    assert_eq!(repairs, [Repair::Restart]);
}

#[test]
fn a_parenthesis_about_the_rules_at_the_start_is_dropped() {
    // Seen with SmolLM2 in the instruct layout.
    let (out, _, _, repairs) = stitch("A tomato is a type of meat that", &[" (Also, avoid quoting", " the opening)", " grows on vines."]);
    assert_eq!(out, " grows on vines.");
    assert_eq!(repairs, [Repair::Scaffold]);
    assert_eq!(text("The ideal fridge temperature is 40°F", &[" (4°C)", " or a little lower."]), " (4°C) or a little lower.", "an answer's own parenthesis stays");
}

/// The restated opener, the marker and the redirect as llama.cpp's server really streamed them
/// under a grammar (tests/cloud_real.rs), token splits sampled from its runs: each gives the
/// same dash and redirect.
#[test]
fn a_restated_opener_and_marker_in_the_real_servers_token_splits_give_one_redirect() {
    let opener = "Yes, dogs can safely eat grapes";
    let splits: &[&[&str]] = &[
        &["Y", "es", ",", " dogs", " can", " safely", " eat", " grapes", " ", "[[", "r", "edi", "re", "c", "t", "]]", " ", "A", "c", "t", "ual", "ly", ",", " grapes", " are", " toxic", "."],
        &["Yes", ",", " dogs", " can", " safely", " eat", " grapes", " ", "[[", "re", "direct", "]", "]", " A", "ct", "ua", "l", "ly", ",", " grapes", " are", " toxic", "."],
        &["Yes", ",", " dogs", " can", " safely", " eat", " grapes", " ", "[[", "re", "direct", "]]", " ", "A", "ct", "u", "all", "y", ",", " grape", "s", " are", " toxic", "."],
        &["Yes", ",", " dogs", " can", " safely", " eat", " grapes", " ", "[[", "re", "direct", "]]", " A", "c", "t", "ually", ",", " grapes", " are", " toxic", "."],
        &["Yes", ",", " dogs", " can", " safely", " eat", " grapes", " [", "[", "red", "irect", "]]", " ", "A", "c", "t", "ual", "l", "y", ",", " grape", "s", " are", " ", "to", "x", "ic", "."],
        &["Y", "es", ",", " dogs", " can", " safely", " eat", " grapes", " ", "[[", "r", "edi", "re", "c", "t", "]]", " A", "c", "t", "ually", ",", " grape", "s", " are", " toxic", "."],
    ];
    for deltas in splits {
        let (out, corrected, _, repairs) = stitch(opener, deltas);
        assert_eq!(out, " — actually, grapes are toxic.", "{deltas:?}");
        assert!(corrected, "{deltas:?}");
        assert_eq!(repairs, [Repair::Restated], "{deltas:?}");
    }
}
