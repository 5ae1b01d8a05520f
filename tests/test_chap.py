"""CHAP: responses against independent vectors, and both sides back to back, good and hostile."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyiscsi_failover.credentials import MASK, ChapCredentials, Secret
from pyiscsi_failover.errors import (
    AuthenticationError,
    ChapDowngradeError,
    ChapReflectionError,
    ISCSIError,
    LocalProtocolError,
    TargetAuthenticationError,
    TextError,
)
from pyiscsi_failover.protocol.chap import (
    DEFAULT_ALGORITHMS,
    ChallengeHistory,
    ChapAlgorithm,
    ChapAuthenticator,
    ChapInitiator,
    ChapPolicy,
    chap_response,
)
from pyiscsi_failover.protocol.text import format_binary, parse_binary

ALGORITHMS = tuple(ChapAlgorithm)
# Recognisable secrets, so a test can search any text for them (and for their hex form).
INITIATOR_SECRET = "Initiator-Walrus-58213"
TARGET_SECRET = "Target-Pelican-90417"
SECRETS = (INITIATOR_SECRET, TARGET_SECRET)
ME = ChapCredentials("iqn.2024-01.test:initiator", Secret(INITIATOR_SECRET))
TARGET = ChapCredentials("iqn.2024-01.test:target", Secret(TARGET_SECRET))

Keys = Mapping[str, str]


def counting_bytes(seed: int) -> Callable[[int], bytes]:
    """A deterministic random source: a different block on every call."""
    counter = 0

    def token_bytes(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(f"{seed}/{counter}".encode()).digest(n)

    return token_bytes


def make_initiator(
    *,
    mutual: bool = False,
    target: ChapCredentials = TARGET,
    policy: ChapPolicy | None = None,
    seed: int = 1,
    history: ChallengeHistory | None = None,
) -> ChapInitiator:
    return ChapInitiator(
        ME,
        target_credentials=target if mutual else None,
        policy=policy or ChapPolicy(),
        token_bytes=counting_bytes(seed),
        history=ChallengeHistory() if history is None else history,
    )


def make_target(
    *,
    mutual: ChapCredentials | None = TARGET,
    algorithms: tuple[ChapAlgorithm, ...] = DEFAULT_ALGORITHMS,
    accounts: Mapping[str, Secret] | None = None,
    seed: int = 2,
    challenge_length: int | None = None,
) -> ChapAuthenticator:
    return ChapAuthenticator(
        {ME.username: ME.secret} if accounts is None else accounts,
        mutual=mutual,
        algorithms=algorithms,
        token_bytes=counting_bytes(seed),
        challenge_length=challenge_length,
    )


def challenge_keys(algorithm: int, identifier: int, challenge: bytes) -> dict[str, str]:
    return {
        "CHAP_A": str(algorithm),
        "CHAP_I": str(identifier),
        "CHAP_C": format_binary(challenge),
    }


def reached_challenge(initiator: ChapInitiator, target: ChapAuthenticator) -> dict[str, str]:
    """Run AuthMethod and CHAP_A; return the target's challenge keys."""
    assert initiator.auth_method_offer() == "CHAP"
    initiator.check_auth_method("CHAP")
    (offer,) = initiator.offer()
    assert offer[0] == "CHAP_A"
    return dict(target.select_algorithm(offer[1]))


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert secret.encode().hex() not in text


# --- chap_response -----------------------------------------------------------------------------

# Computed with `openssl dgst -<alg>` (not Python) over 0x2a || b"correct horse battery" ||
# bytes 0x00..0x0f: identifier 42, that secret, a 16-byte challenge.
OPENSSL_VECTORS = {
    ChapAlgorithm.MD5: "7efffe0f324cdaeb9442b9216e36d904",
    ChapAlgorithm.SHA1: "f960d1db12d99fa70d7120fdb7368a2226f7ca0b",
    ChapAlgorithm.SHA256: "27750b3c27f8f918a878a6e96ac6ba3778f21ad55a7cd93fbd1424ab63cbe87b",
    ChapAlgorithm.SHA3_256: "983c8a268420313515d40186ac94b8c2146173a611c48d1fa21af77a5fe8f0cd",
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_response_matches_openssl_vectors(algorithm: ChapAlgorithm) -> None:
    secret = b"correct horse battery"
    challenge = bytes(range(16))
    expected = bytes.fromhex(OPENSSL_VECTORS[algorithm])
    assert chap_response(algorithm, 42, secret, challenge) == expected
    assert chap_response(int(algorithm), 42, Secret(secret), challenge) == expected


def test_rfc1994_form_is_identifier_then_secret_then_challenge() -> None:
    # RFC 1994 section 4.1: the Response Value is the one-way hash calculated over a stream of
    # octets consisting of the Identifier, followed by the "secret", followed by the Challenge.
    identifier, secret, challenge = 0x01, b"ThisIsA16Secret!", bytes.fromhex("00112233" * 4)
    stream = b"\x01" + b"ThisIsA16Secret!" + bytes.fromhex("00112233" * 4)
    assert chap_response(ChapAlgorithm.MD5, identifier, secret, challenge) == (
        hashlib.md5(stream).digest()
    )
    # Order matters: the same parts in another order give another response.
    assert chap_response(ChapAlgorithm.MD5, identifier, secret, challenge) != (
        hashlib.md5(b"\x01" + challenge + secret).digest()
    )


@settings(max_examples=200)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    identifier=st.integers(0, 255),
    secret=st.binary(max_size=64),
    challenge=st.binary(max_size=1024),
)
def test_response_is_hash_of_identifier_secret_challenge(
    algorithm: ChapAlgorithm, identifier: int, secret: bytes, challenge: bytes
) -> None:
    expected = hashlib.new(algorithm.hash_name, bytes([identifier]) + secret + challenge).digest()
    assert chap_response(algorithm, identifier, secret, challenge) == expected
    assert chap_response(algorithm, identifier, Secret(secret), challenge) == expected
    assert len(expected) == algorithm.digest_size


def test_algorithm_numbers_and_digests() -> None:
    assert [(int(a), a.hash_name, a.digest_size) for a in ChapAlgorithm] == [
        (5, "md5", 16),
        (6, "sha1", 20),
        (7, "sha256", 32),
        (8, "sha3_256", 32),
    ]
    for algorithm in ChapAlgorithm:
        assert hashlib.new(algorithm.hash_name).digest_size == algorithm.digest_size


@pytest.mark.parametrize("identifier", [-1, 256, 1000, True])
def test_response_refuses_bad_identifier(identifier: int) -> None:
    with pytest.raises(LocalProtocolError, match="identifier"):
        chap_response(ChapAlgorithm.MD5, identifier, b"secret", b"c" * 16)


@pytest.mark.parametrize("algorithm", [0, 4, 9, 255, -5])
def test_response_refuses_unknown_algorithm(algorithm: int) -> None:
    with pytest.raises(LocalProtocolError, match="unknown CHAP algorithm"):
        chap_response(algorithm, 1, b"secret", b"c" * 16)


# --- back to back ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("mutual", [False, True], ids=["one-way", "mutual"])
def test_initiator_and_target_agree(algorithm: ChapAlgorithm, mutual: bool) -> None:
    initiator = make_initiator(mutual=mutual)
    target = make_target(algorithms=(algorithm,))
    challenge = reached_challenge(initiator, target)
    assert challenge["CHAP_A"] == str(int(algorithm))
    answer = dict(initiator.answer_challenge(challenge))
    assert initiator.algorithm is algorithm
    assert answer["CHAP_N"] == ME.username
    assert answer["CHAP_R"].startswith("0x")
    assert answer["CHAP_R"] == answer["CHAP_R"].lower()
    assert len(parse_binary("CHAP_R", answer["CHAP_R"])) == algorithm.digest_size
    reply = target.check_response(answer)
    assert target.authenticated_username == ME.username
    assert initiator.mutual is mutual
    if mutual:
        assert set(answer) == {"CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"}
        assert not initiator.complete
        assert dict(reply)["CHAP_N"] == TARGET.username
        initiator.verify_target(dict(reply))
    else:
        assert set(answer) == {"CHAP_N", "CHAP_R"}
        assert reply == []
    assert initiator.complete


def test_offer_lists_md5_first() -> None:
    assert make_initiator().offer() == [("CHAP_A", "5,6,7,8")]
    policy = ChapPolicy(algorithms=(ChapAlgorithm.SHA256, ChapAlgorithm.SHA1))
    assert make_initiator(policy=policy).offer() == [("CHAP_A", "7,6")]


def test_target_picks_first_supported_in_initiator_order() -> None:
    target = make_target(algorithms=(ChapAlgorithm.MD5, ChapAlgorithm.SHA256))
    keys = dict(target.select_algorithm("9,junk,,7,5"))
    assert keys["CHAP_A"] == "7"
    assert target.algorithm is ChapAlgorithm.SHA256
    # Default sides settle on MD5, which is first in our offer.
    assert reached_challenge(make_initiator(), make_target())["CHAP_A"] == "5"


@pytest.mark.parametrize(
    ("algorithm", "length"),
    [
        (ChapAlgorithm.MD5, 16),
        (ChapAlgorithm.SHA1, 20),
        (ChapAlgorithm.SHA256, 32),
        (ChapAlgorithm.SHA3_256, 32),
    ],
)
def test_our_challenge_is_as_long_as_the_digest(algorithm: ChapAlgorithm, length: int) -> None:
    initiator = make_initiator(mutual=True)
    target = make_target(algorithms=(algorithm,))
    answer = dict(initiator.answer_challenge(reached_challenge(initiator, target)))
    assert len(parse_binary("CHAP_C", answer["CHAP_C"])) == length
    assert (
        len(
            parse_binary(
                "CHAP_C",
                reached_challenge(make_initiator(), make_target(algorithms=(algorithm,)))["CHAP_C"],
            )
        )
        == length
    )


def test_policy_challenge_length_and_identifier_injection() -> None:
    initiator = ChapInitiator(
        ME,
        target_credentials=TARGET,
        policy=ChapPolicy(challenge_length=40),
        token_bytes=counting_bytes(5),
        identifier=lambda: 77,
        history=ChallengeHistory(),
    )
    initiator.offer()
    answer = dict(initiator.answer_challenge(challenge_keys(5, 1, b"t" * 16)))
    assert answer["CHAP_I"] == "77"
    assert len(parse_binary("CHAP_C", answer["CHAP_C"])) == 40


def test_base64_challenge_is_accepted() -> None:
    initiator = make_initiator()
    initiator.offer()
    challenge = bytes(range(32))
    answer = dict(
        initiator.answer_challenge(
            {
                "CHAP_A": "5",
                "CHAP_I": "9",
                "CHAP_C": "0bAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            }
        )
    )
    expected = chap_response(ChapAlgorithm.MD5, 9, ME.secret, challenge)
    assert parse_binary("CHAP_R", answer["CHAP_R"]) == expected


@settings(max_examples=60)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    mutual=st.booleans(),
    username=st.from_regex(r"[a-zA-Z0-9.:-]{1,40}", fullmatch=True),
    my_secret=st.binary(min_size=12, max_size=40),
    target_secret=st.binary(min_size=12, max_size=40),
    seeds=st.tuples(st.integers(), st.integers()),
)
def test_back_to_back_with_any_credentials(
    algorithm: ChapAlgorithm,
    mutual: bool,
    username: str,
    my_secret: bytes,
    target_secret: bytes,
    seeds: tuple[int, int],
) -> None:
    me = ChapCredentials(username, Secret(my_secret))
    them = ChapCredentials("target", Secret(target_secret))
    initiator = ChapInitiator(
        me,
        target_credentials=them if mutual else None,
        token_bytes=counting_bytes(seeds[0]),
        history=ChallengeHistory(),
    )
    target = ChapAuthenticator(
        {username: me.secret},
        mutual=them,
        algorithms=(algorithm,),
        token_bytes=counting_bytes(seeds[1]),
    )
    initiator.check_auth_method("CHAP")
    challenge = dict(target.select_algorithm(initiator.offer()[0][1]))
    reply = target.check_response(dict(initiator.answer_challenge(challenge)))
    if my_secret == target_secret and mutual:
        with pytest.raises(ChapReflectionError):
            initiator.verify_target(dict(reply))
        return
    if mutual:
        initiator.verify_target(dict(reply))
    assert initiator.complete
    assert target.authenticated_username == username


# --- a hostile or broken target ----------------------------------------------------------------


@pytest.mark.parametrize("chosen", ["None", "", "SRP", "CHAP,None", "chap", "Reject", "KRB5"])
def test_auth_method_other_than_chap_is_a_downgrade(chosen: str) -> None:
    initiator = make_initiator()
    with pytest.raises(ChapDowngradeError, match="AuthMethod"):
        initiator.check_auth_method(chosen)
    # The failure is final.
    with pytest.raises(LocalProtocolError):
        initiator.offer()


@pytest.mark.parametrize("chap_a", ["5", "6", "8", "9", "0"])
def test_algorithm_we_did_not_offer_is_refused(chap_a: str) -> None:
    initiator = make_initiator(policy=ChapPolicy(algorithms=(ChapAlgorithm.SHA256,)))
    initiator.offer()
    with pytest.raises(ChapDowngradeError, match=f"CHAP_A={chap_a}"):
        initiator.answer_challenge({"CHAP_A": chap_a, "CHAP_I": "1", "CHAP_C": "0x" + "ab" * 16})


@pytest.mark.parametrize("chap_a", ["Reject", "NotUnderstood", "Irrelevant"])
def test_target_refusing_every_algorithm(chap_a: str) -> None:
    initiator = make_initiator()
    initiator.offer()
    with pytest.raises(AuthenticationError, match="none of the CHAP algorithms"):
        initiator.answer_challenge({"CHAP_A": chap_a, "CHAP_I": "1", "CHAP_C": "0x" + "ab" * 16})


@pytest.mark.parametrize(
    "keys",
    [
        {"CHAP_A": "5,6", "CHAP_I": "1", "CHAP_C": "0x" + "ab" * 16},
        {"CHAP_A": "five", "CHAP_I": "1", "CHAP_C": "0x" + "ab" * 16},
        {"CHAP_A": "5", "CHAP_I": "256", "CHAP_C": "0x" + "ab" * 16},
        {"CHAP_A": "5", "CHAP_I": "-1", "CHAP_C": "0x" + "ab" * 16},
        {"CHAP_A": "5", "CHAP_I": "", "CHAP_C": "0x" + "ab" * 16},
        {"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0x" + "zz" * 16},
        {"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "ab" * 16},
        {"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0b!!!!"},
        {"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0x"},
        {"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0x" + "ab" * 15},
        {"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0x" + "ab" * 1025},
        {"CHAP_A": "5", "CHAP_I": "1"},
        {"CHAP_A": "5", "CHAP_C": "0x" + "ab" * 16},
        {"CHAP_I": "1", "CHAP_C": "0x" + "ab" * 16},
        {},
    ],
)
def test_malformed_challenges_raise_our_errors(keys: dict[str, str]) -> None:
    initiator = make_initiator()
    initiator.offer()
    with pytest.raises((AuthenticationError, TextError)) as info:
        initiator.answer_challenge(keys)
    assert_no_secret(str(info.value))
    with pytest.raises(LocalProtocolError):
        initiator.answer_challenge(challenge_keys(5, 1, b"x" * 16))


def test_short_challenge_message_and_policy() -> None:
    initiator = make_initiator()
    initiator.offer()
    with pytest.raises(AuthenticationError, match="15 bytes, shorter than the 16"):
        initiator.answer_challenge(challenge_keys(5, 1, b"s" * 15))
    # A policy may accept shorter challenges, but an empty one never.
    relaxed = make_initiator(policy=ChapPolicy(min_challenge_length=0))
    relaxed.offer()
    assert dict(relaxed.answer_challenge(challenge_keys(5, 1, b"s")))["CHAP_N"] == ME.username
    relaxed = make_initiator(policy=ChapPolicy(min_challenge_length=0))
    relaxed.offer()
    with pytest.raises((AuthenticationError, TextError)):
        relaxed.answer_challenge({"CHAP_A": "5", "CHAP_I": "1", "CHAP_C": "0x"})


def test_long_challenge_limit() -> None:
    initiator = make_initiator()
    initiator.offer()
    assert initiator.answer_challenge(challenge_keys(5, 1, b"L" * 1024))
    initiator = make_initiator(policy=ChapPolicy(max_challenge_length=64))
    initiator.offer()
    with pytest.raises(AuthenticationError, match="65 bytes, longer than the 64"):
        initiator.answer_challenge(challenge_keys(5, 1, b"L" * 65))


def test_reflected_challenge_is_refused_within_history() -> None:
    history = ChallengeHistory()
    first = make_initiator(mutual=True, history=history, seed=10)
    first.offer()
    ours = dict(first.answer_challenge(challenge_keys(5, 3, b"a" * 16)))["CHAP_C"]
    # A rogue target replays our mutual challenge in the next login, hoping we answer it.
    second = make_initiator(mutual=True, history=history, seed=11)
    second.offer()
    with pytest.raises(ChapReflectionError, match="reflection"):
        second.answer_challenge({"CHAP_A": "5", "CHAP_I": "3", "CHAP_C": ours})


def test_reflected_challenge_is_refused_with_the_default_history() -> None:
    # No history given: the process-wide one, with the real random source.
    first = ChapInitiator(ME, target_credentials=TARGET)
    first.offer()
    ours = dict(first.answer_challenge(challenge_keys(5, 3, b"b" * 16)))["CHAP_C"]
    second = ChapInitiator(ME, target_credentials=TARGET)
    second.offer()
    # Spelling the hex in upper case does not disguise it.
    with pytest.raises(ChapReflectionError):
        second.answer_challenge({"CHAP_A": "5", "CHAP_I": "3", "CHAP_C": "0x" + ours[2:].upper()})


def test_our_challenges_are_never_reused() -> None:
    history = ChallengeHistory()
    repeated = b"r" * 16
    fresh = b"f" * 16
    outputs = iter([repeated, repeated, fresh])

    def token_bytes(n: int) -> bytes:
        return next(outputs)[:n]

    first = ChapInitiator(
        ME,
        target_credentials=TARGET,
        token_bytes=token_bytes,
        identifier=lambda: 1,
        history=history,
    )
    first.offer()
    assert dict(first.answer_challenge(challenge_keys(5, 1, b"x" * 16)))["CHAP_C"] == (
        format_binary(repeated)
    )
    second = ChapInitiator(
        ME,
        target_credentials=TARGET,
        token_bytes=token_bytes,
        identifier=lambda: 1,
        history=history,
    )
    second.offer()
    # The source repeated itself once; the second challenge skips the repeat.
    assert dict(second.answer_challenge(challenge_keys(5, 1, b"y" * 16)))["CHAP_C"] == (
        format_binary(fresh)
    )


def test_our_challenge_never_equals_the_targets() -> None:
    target_challenge = b"T" * 16
    outputs = iter([target_challenge, b"U" * 16])
    initiator = ChapInitiator(
        ME,
        target_credentials=TARGET,
        token_bytes=lambda n: next(outputs),
        identifier=lambda: 1,
        history=ChallengeHistory(),
    )
    initiator.offer()
    answer = dict(initiator.answer_challenge(challenge_keys(5, 1, target_challenge)))
    assert answer["CHAP_C"] == format_binary(b"U" * 16)


def test_broken_random_source_is_a_local_error() -> None:
    stuck = ChapInitiator(
        ME,
        target_credentials=TARGET,
        token_bytes=lambda n: b"s" * n,
        identifier=lambda: 1,
        history=ChallengeHistory(),
    )
    stuck.offer()
    with pytest.raises(LocalProtocolError, match="keeps repeating"):
        stuck.answer_challenge(challenge_keys(5, 1, b"s" * 16))
    short = ChapInitiator(
        ME, target_credentials=TARGET, token_bytes=lambda n: b"s", history=ChallengeHistory()
    )
    short.offer()
    with pytest.raises(LocalProtocolError, match="returned 1 bytes"):
        short.answer_challenge(challenge_keys(5, 1, b"x" * 16))
    bad_identifier = ChapInitiator(
        ME, target_credentials=TARGET, identifier=lambda: 300, history=ChallengeHistory()
    )
    bad_identifier.offer()
    with pytest.raises(LocalProtocolError, match="300"):
        bad_identifier.answer_challenge(challenge_keys(5, 1, b"x" * 16))


def mutual_exchange(
    algorithm: ChapAlgorithm = ChapAlgorithm.SHA256,
) -> tuple[ChapInitiator, dict[str, str]]:
    """An initiator that has sent its mutual challenge, and what it sent."""
    initiator = make_initiator(mutual=True)
    initiator.offer()
    answer = dict(initiator.answer_challenge(challenge_keys(algorithm, 7, b"c" * 32)))
    return initiator, answer


def our_challenge(answer: Mapping[str, str]) -> tuple[int, bytes]:
    return int(answer["CHAP_I"]), parse_binary("CHAP_C", answer["CHAP_C"])


def test_wrong_mutual_response_is_refused() -> None:
    initiator, answer = mutual_exchange()
    identifier, challenge = our_challenge(answer)
    wrong = chap_response(ChapAlgorithm.SHA256, identifier, b"not-the-target-secret", challenge)
    with pytest.raises(TargetAuthenticationError, match="wrong CHAP_R") as info:
        initiator.verify_target({"CHAP_N": TARGET.username, "CHAP_R": format_binary(wrong)})
    assert_no_secret(str(info.value))
    assert not initiator.complete


def test_mutual_response_with_wrong_algorithm_or_identifier_is_refused() -> None:
    initiator, answer = mutual_exchange()
    identifier, challenge = our_challenge(answer)
    # What tgt would compute when it treats CHAP_A=7 as SHA-1.
    sha1 = chap_response(ChapAlgorithm.SHA1, identifier, TARGET.secret, challenge)
    with pytest.raises(TargetAuthenticationError):
        initiator.verify_target({"CHAP_N": TARGET.username, "CHAP_R": format_binary(sha1)})
    initiator, answer = mutual_exchange()
    identifier, challenge = our_challenge(answer)
    other = chap_response(ChapAlgorithm.SHA256, (identifier + 1) % 256, TARGET.secret, challenge)
    with pytest.raises(TargetAuthenticationError):
        initiator.verify_target({"CHAP_N": TARGET.username, "CHAP_R": format_binary(other)})


def test_mutual_response_computed_with_our_own_secret_is_refused() -> None:
    initiator, answer = mutual_exchange()
    identifier, challenge = our_challenge(answer)
    mirrored = chap_response(ChapAlgorithm.SHA256, identifier, ME.secret, challenge)
    with pytest.raises(ChapReflectionError, match="own secret"):
        initiator.verify_target({"CHAP_N": TARGET.username, "CHAP_R": format_binary(mirrored)})


def test_same_secret_both_ways_warns_then_fails(caplog: pytest.LogCaptureFixture) -> None:
    same = ChapCredentials(TARGET.username, ME.secret)
    with caplog.at_level(logging.WARNING, logger="pyiscsi_failover.protocol.chap"):
        initiator = make_initiator(mutual=True, target=same)
    assert "same secret in both directions" in caplog.text
    assert_no_secret(caplog.text)
    target = make_target(mutual=same)
    reply = target.check_response(
        dict(initiator.answer_challenge(reached_challenge(initiator, target)))
    )
    with pytest.raises(ChapReflectionError):
        initiator.verify_target(dict(reply))


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"CHAP_N": TARGET.username}, "lacks CHAP_R"),
        ({"CHAP_R": "0x" + "00" * 32}, "lacks CHAP_N"),
        ({}, "lacks CHAP_N"),
        ({"CHAP_N": "iqn.2024-01.test:impostor", "CHAP_R": "0x" + "00" * 32}, "impostor"),
    ],
)
def test_mutual_answer_missing_or_misnamed(keys: dict[str, str], problem: str) -> None:
    initiator, _ = mutual_exchange()
    with pytest.raises(TargetAuthenticationError, match=problem):
        initiator.verify_target(keys)


def test_non_binary_mutual_response_is_a_text_error() -> None:
    initiator, _ = mutual_exchange()
    with pytest.raises(TextError):
        initiator.verify_target({"CHAP_N": TARGET.username, "CHAP_R": "0xnothex"})


def test_calls_out_of_order_are_local_errors() -> None:
    initiator = make_initiator()
    with pytest.raises(LocalProtocolError, match="answer_challenge"):
        initiator.answer_challenge(challenge_keys(5, 1, b"x" * 16))
    initiator.offer()
    with pytest.raises(LocalProtocolError, match="offer"):
        initiator.offer()
    with pytest.raises(LocalProtocolError, match="only for mutual"):
        initiator.verify_target({})
    mutual = make_initiator(mutual=True)
    mutual.offer()
    with pytest.raises(LocalProtocolError, match="verify_target"):
        mutual.verify_target({})


# --- the target side ---------------------------------------------------------------------------


def test_target_refuses_wrong_secret_and_unknown_user() -> None:
    impostor = ChapCredentials(ME.username, Secret("Guessed-Secret-0000"))
    initiator = ChapInitiator(impostor, history=ChallengeHistory())
    target = make_target()
    with pytest.raises(AuthenticationError, match="wrong CHAP_R"):
        target.check_response(
            dict(initiator.answer_challenge(reached_challenge(initiator, target)))
        )
    stranger = ChapInitiator(
        ChapCredentials("stranger", Secret("Stranger-Secret-1")), history=ChallengeHistory()
    )
    target = make_target()
    with pytest.raises(AuthenticationError, match="unknown CHAP user 'stranger'"):
        target.check_response(dict(stranger.answer_challenge(reached_challenge(stranger, target))))


def test_target_with_no_common_algorithm() -> None:
    target = make_target(algorithms=(ChapAlgorithm.SHA3_256,))
    with pytest.raises(AuthenticationError, match="none of the initiator's CHAP algorithms"):
        target.select_algorithm("5,6,7")
    with pytest.raises(LocalProtocolError):
        target.check_response({})


def test_target_refuses_reflected_mutual_challenge() -> None:
    target = make_target()
    challenge = dict(target.select_algorithm("5"))
    identifier = int(challenge["CHAP_I"])
    response = chap_response(5, identifier, ME.secret, parse_binary("CHAP_C", challenge["CHAP_C"]))
    with pytest.raises(ChapReflectionError):
        target.check_response(
            {
                "CHAP_N": ME.username,
                "CHAP_R": format_binary(response),
                "CHAP_I": challenge["CHAP_I"],
                "CHAP_C": challenge["CHAP_C"],
            }
        )


def test_target_without_mutual_credentials_refuses_mutual() -> None:
    initiator = make_initiator(mutual=True)
    target = make_target(mutual=None)
    with pytest.raises(AuthenticationError, match="no credentials"):
        target.check_response(
            dict(initiator.answer_challenge(reached_challenge(initiator, target)))
        )


def test_target_short_challenge_for_fault_injection() -> None:
    target = make_target(challenge_length=8)
    challenge = dict(target.select_algorithm("5"))
    assert len(parse_binary("CHAP_C", challenge["CHAP_C"])) == 8
    initiator = make_initiator()
    initiator.offer()
    with pytest.raises(AuthenticationError, match="shorter"):
        initiator.answer_challenge(challenge)


@pytest.mark.parametrize(
    "extra",
    [
        {"CHAP_I": "1"},
        {"CHAP_C": "0x" + "ab" * 16},
        {"CHAP_I": "1", "CHAP_C": "0x"},
        {"CHAP_I": "x", "CHAP_C": "0x" + "ab" * 16},
        {"CHAP_I": "1", "CHAP_C": "0xgg"},
    ],
)
def test_target_malformed_mutual_request(extra: dict[str, str]) -> None:
    target = make_target()
    challenge = dict(target.select_algorithm("5"))
    response = chap_response(
        5, int(challenge["CHAP_I"]), ME.secret, parse_binary("CHAP_C", challenge["CHAP_C"])
    )
    with pytest.raises((AuthenticationError, TextError)):
        target.check_response({"CHAP_N": ME.username, "CHAP_R": format_binary(response), **extra})


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"algorithms": ()}, "at least one"),
        ({"algorithms": (ChapAlgorithm.MD5, ChapAlgorithm.MD5)}, "twice"),
        ({"algorithms": (9,)}, "unknown"),
        ({"challenge_length": 15}, "challenge_length"),
        ({"challenge_length": 1025}, "challenge_length"),
        ({"min_challenge_length": 100, "max_challenge_length": 50}, "min_challenge_length"),
        ({"min_challenge_length": -1}, "min_challenge_length"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(LocalProtocolError, match=problem):
        ChapPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_accepts_plain_integers() -> None:
    policy = ChapPolicy(algorithms=(7, 5))  # type: ignore[arg-type]
    assert policy.algorithms == (ChapAlgorithm.SHA256, ChapAlgorithm.MD5)
    assert all(isinstance(a, ChapAlgorithm) for a in policy.algorithms)
    assert policy.own_challenge_length(ChapAlgorithm.MD5) == 16


def test_empty_username_or_secret_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="secret"):
        ChapInitiator(ChapCredentials("user", Secret("")))
    with pytest.raises(LocalProtocolError, match="username"):
        ChapInitiator(ChapCredentials("", Secret("Long-Enough-Secret")))
    with pytest.raises(LocalProtocolError, match="secret"):
        ChapAuthenticator({"user": Secret("")})


def test_short_secret_warns_without_showing_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pyiscsi_failover.protocol.chap"):
        ChapInitiator(ChapCredentials("shorty", Secret("Tiny-9x")))
        ChapAuthenticator({"shorty2": Secret("Tiny-8y")})
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "shorty" in messages[0]
    assert "shorter than 12 bytes" in messages[0]
    assert "shorty2" in messages[1]
    for message in messages:
        assert "Tiny-9x" not in message
        assert "Tiny-8y" not in message


def test_long_secret_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pyiscsi_failover.protocol.chap"):
        ChapInitiator(ME, target_credentials=TARGET)
        ChapInitiator(ChapCredentials("twelve", Secret("x" * 12)))
    assert caplog.records == []


# --- secrets never shown -----------------------------------------------------------------------


def test_reprs_never_show_secrets() -> None:
    initiator = make_initiator(mutual=True)
    target = make_target()
    texts = [repr(initiator), str(initiator), repr(target), repr(ME), str(ME), repr(ME.secret)]
    initiator.answer_challenge(reached_challenge(initiator, target))
    texts += [repr(initiator), repr(target)]
    for text in texts:
        assert_no_secret(text)
    assert ME.username in repr(initiator)
    assert TARGET.username in repr(initiator)
    assert MASK in repr(ME)


def test_error_messages_and_logs_never_show_secrets(caplog: pytest.LogCaptureFixture) -> None:
    messages: list[str] = []
    with caplog.at_level(logging.DEBUG):
        # Our secret or the target's, with the right identifier or a wrong one.
        for secret in (ME.secret, TARGET.secret):
            for shift in (0, 1):
                probe, probe_answer = mutual_exchange()
                identifier, challenge = our_challenge(probe_answer)
                response = chap_response(
                    ChapAlgorithm.SHA256, (identifier + shift) % 256, secret, challenge
                )
                try:
                    probe.verify_target(
                        {"CHAP_N": TARGET.username, "CHAP_R": format_binary(response)}
                    )
                except ISCSIError as exc:
                    messages.append(str(exc))
        target = make_target()
        target.select_algorithm("5")
        try:
            target.check_response({"CHAP_N": ME.username, "CHAP_R": "0x" + "00" * 16})
        except ISCSIError as exc:
            messages.append(str(exc))
    # Three wrong mutual answers (only the target secret with the right identifier passes) and
    # the target refusing a wrong CHAP_R.
    assert len(messages) == 4
    for text in [*messages, caplog.text]:
        assert_no_secret(text)


# --- totality ----------------------------------------------------------------------------------

_chap_values = st.one_of(
    st.text(max_size=20),
    st.integers(-5, 300).map(str),
    st.binary(max_size=40).map(lambda b: "0x" + b.hex()),
    st.sampled_from(["Reject", "NotUnderstood", "Irrelevant", "0x", "0b", "5,6", "0b=="]),
)
_chap_keys = st.dictionaries(
    st.sampled_from(["CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R", "Other"]),
    _chap_values,
)


@settings(max_examples=300)
@given(keys=_chap_keys, mutual=st.booleans())
def test_any_target_answer_raises_only_our_errors(keys: dict[str, str], mutual: bool) -> None:
    initiator = make_initiator(mutual=mutual)
    initiator.offer()
    try:
        answer = initiator.answer_challenge(keys)
    except (AuthenticationError, TextError):
        return  # anything else (a builtin error, a LocalProtocolError) fails the test
    assert dict(answer)["CHAP_N"] == ME.username
    if mutual:
        with pytest.raises((AuthenticationError, TextError)):
            initiator.verify_target(keys)


@settings(max_examples=300)
@given(offer=st.text(max_size=20), keys=_chap_keys)
def test_any_initiator_input_raises_only_our_errors(offer: str, keys: dict[str, str]) -> None:
    target = make_target()
    try:
        target.select_algorithm(offer)
    except AuthenticationError:
        return  # no algorithm in common; anything else fails the test
    # Random keys never authenticate (a random CHAP_R matching the digest will not happen).
    with pytest.raises((AuthenticationError, TextError)):
        target.check_response(keys)


# --- odds and ends -----------------------------------------------------------------------------


def test_challenge_history_is_bounded() -> None:
    history = ChallengeHistory(maxlen=2)
    for challenge in (b"a", b"b", b"b", b"c"):
        history.remember(challenge)
    assert len(history) == 2
    assert b"a" not in history  # the oldest went first
    assert b"b" in history
    assert b"c" in history
    assert repr(history) == "ChallengeHistory(maxlen=2, remembered=2)"
    with pytest.raises(LocalProtocolError, match="at least one"):
        ChallengeHistory(maxlen=0)


def test_unavailable_hash_is_a_local_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_md5(name: str, *args: object) -> object:
        raise ValueError(f"unsupported hash type {name}")  # what a FIPS-mode OpenSSL says

    monkeypatch.setattr(hashlib, "new", no_md5)
    with pytest.raises(LocalProtocolError, match="md5 for CHAP_A=5 is unavailable"):
        chap_response(ChapAlgorithm.MD5, 1, b"secret", b"c" * 16)


def test_authenticator_configuration_errors() -> None:
    with pytest.raises(LocalProtocolError, match="at least one algorithm"):
        ChapAuthenticator({ME.username: ME.secret}, algorithms=())
    for length in (0, 1025):
        with pytest.raises(LocalProtocolError, match="challenge_length"):
            ChapAuthenticator({ME.username: ME.secret}, challenge_length=length)
    with pytest.raises(LocalProtocolError, match="ChapCredentials"):
        ChapInitiator(("user", "secret"))  # type: ignore[arg-type]
    broken = ChapAuthenticator({ME.username: ME.secret}, token_bytes=lambda n: b"x")
    with pytest.raises(LocalProtocolError, match="returned 1 bytes"):
        broken.select_algorithm("5")


def test_authenticator_refuses_over_long_mutual_challenge() -> None:
    target = make_target()
    challenge = dict(target.select_algorithm("5"))
    response = chap_response(
        5, int(challenge["CHAP_I"]), ME.secret, parse_binary("CHAP_C", challenge["CHAP_C"])
    )
    with pytest.raises(AuthenticationError, match="longer than 1024"):
        target.check_response(
            {
                "CHAP_N": ME.username,
                "CHAP_R": format_binary(response),
                "CHAP_I": "1",
                "CHAP_C": "0x" + "ab" * 1025,
            }
        )
    assert "iqn.2024-01.test:initiator" in repr(target)
    assert "'failed'" in repr(target)
