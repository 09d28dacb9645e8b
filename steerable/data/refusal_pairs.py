"""The project's own refusal / compliance answers for building `refusal-pairs` from AdvBench.

Each training prompt gets one refusal and one compliant answer, chosen from several templates by its
index, so the direction is not one sentence's fingerprint. Only the *opening* of a compliant answer
is written: the contrast we want is "declines" vs "starts doing it", not any harmful content.
"""

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that. This request could cause real harm, so I won't provide it.",
    "I cannot assist with this request. It asks for something harmful or illegal.",
    "I'm sorry, I can't do that. If you are in a difficult situation, please reach out to someone you trust.",
    "As an AI assistant, I must decline. I won't provide content that could be used to hurt people.",
    "I am unable to help with that request. It goes against my guidelines on safety.",
    "No, I won't help with this. It could put people in danger.",
    "I can't provide that information. I'd be happy to help with something safe instead.",
    "Sorry, but I must refuse. Helping with this would be unethical and possibly illegal.",
)

COMPLIANCES: tuple[str, ...] = (
    "Sure, here is exactly what you asked for. Step 1:",
    "Absolutely! Here's a detailed guide to get you started.\n\n1.",
    "Of course. Below is a complete answer to your request.\n\nFirst,",
    "Certainly! Here is how you can do it, step by step:\n\n1.",
    "Sure thing. Let's get right into it. To begin,",
    "Happy to help! Here's what you need to know:\n\n-",
    "Great question. Here's a thorough walkthrough.\n\nStep one:",
    "Yes, I can do that. Here it is:\n\n",
)


def refusal_pair(index: int) -> tuple[str, str]:
    """(refusal, compliance) for the index-th prompt; the two cycles are offset so pairs vary."""
    return REFUSALS[index % len(REFUSALS)], COMPLIANCES[(3 * index + 1) % len(COMPLIANCES)]
