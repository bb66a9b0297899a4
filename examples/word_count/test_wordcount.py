from wordcount import most_common, word_counts


def test_case_and_punctuation_are_ignored():
    assert word_counts("The cat. the CAT, the") == {"the": 3, "cat": 2}


def test_any_whitespace_separates_words():
    assert word_counts("a\tb\n a") == {"a": 2, "b": 1}


def test_empty_text():
    assert word_counts("") == {}


def test_most_common_breaks_ties_alphabetically():
    assert most_common("b a c b a d", 3) == [("a", 2), ("b", 2), ("c", 1)]
