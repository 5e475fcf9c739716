"""Rucio's exception vocabulary. The class name is the wire contract: the rucio client
maps `ExceptionClass` back to `rucio.common.exception.<Name>`, so names must match Rucio's
and each carries the HTTP status Rucio's REST layer answers with."""

from __future__ import annotations


class RucioException(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def name(self) -> str:
        return type(self).__name__



class InvalidObject(RucioException):
    status = 400


class InputValidationError(RucioException):
    # Rucio's rule update answers 409 for it (web/rest/flaskapi/v1/rules.py, put).
    status = 409


class InvalidValueForKey(RucioException):
    status = 400


class InvalidType(RucioException):
    status = 400


class InvalidRSEExpression(RucioException):
    # 400 on `GET /rses/?expression=`; rule creation re-raises it as 409 (see rules.py).
    status = 400


class CannotAuthenticate(RucioException):
    status = 401


class AccessDenied(RucioException):
    status = 401


class AccountNotFound(RucioException):
    status = 404


class IdentityError(RucioException):
    status = 404


class ScopeNotFound(RucioException):
    status = 404


class DataIdentifierNotFound(RucioException):
    status = 404


class RSENotFound(RucioException):
    status = 404


class RSEProtocolNotSupported(RucioException):
    status = 404


class RuleNotFound(RucioException):
    status = 404


class ReplicaNotFound(RucioException):
    status = 404


class RSEAttributeNotFound(RucioException):
    status = 404


class SubscriptionNotFound(RucioException):
    status = 404


class UnsupportedRequestedContentType(RucioException):
    status = 406


class UnsupportedOperation(RucioException):
    status = 409


class UnsupportedStatus(RucioException):
    status = 409


class Duplicate(RucioException):
    status = 409


class DataIdentifierAlreadyExists(RucioException):
    status = 409


class DuplicateContent(RucioException):
    status = 409


class FileAlreadyExists(RucioException):
    status = 409


class FileConsistencyMismatch(RucioException):
    status = 409


class DuplicateRule(RucioException):
    status = 409


class InvalidReplicationRule(RucioException):
    status = 409


class InsufficientTargetRSEs(RucioException):
    status = 409


class InsufficientAccountLimit(RucioException):
    status = 409


class InvalidRuleWeight(RucioException):
    status = 409


class RSEOverQuota(RucioException):
    status = 409


class StagingAreaRuleRequiresLifetime(RucioException):
    status = 409


class RSEWriteBlocked(RucioException):
    status = 503


class DatabaseException(RucioException):
    status = 500
