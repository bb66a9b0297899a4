def word_counts(text):
    """Count words case-insensitively, ignoring punctuation at either end of a word.

    Returns a dict of word -> count, and most_common(text, n) returns the n most
    frequent (word, count) pairs, ties broken alphabetically.
    """
    counts = {}
    for word in text.split(" "):
        counts[word] = counts.get(word, 0) + 1
    return counts


def most_common(text, n):
    counts = word_counts(text)
    return sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:n]
